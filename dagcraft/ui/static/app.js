// dagcraft ui: the run list and run pages, refreshed by polling the JSON API every second.
// Every value from the store is put in the page with textContent (never parsed as HTML); the
// only markup inserted is the DAG drawing, which the server builds with every text escaped.
"use strict";

const TOKEN = document.querySelector('meta[name="dagcraft-token"]').content;
const POLL_MS = 1000;
const POLL_DONE_MS = 3000; // a finished run can still be resumed or retried elsewhere
const FINISHED = new Set(["succeeded", "failed", "cancelled", "rolled_back"]);
const LABELS = {cancel: "Cancel run", resume: "Resume", retry: "Retry from here",
                approve: "Approve", reject: "Reject"};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function setKids(node, ...children) {
  // replaceChildren() would print a null as "null": optional parts are simply left out
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function fmtDur(s) {
  if (s === null || s === undefined) return "—";
  if (s < 10) return s.toFixed(1) + "s";
  if (s < 60) return Math.round(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + String(Math.round(s % 60)).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function fmtAge(s) {
  return s < 5 ? "just now" : fmtDur(s).split(" ")[0].replace(/\.\d/, "") + " ago";
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleString() : "—";
}

function badge(status, id) {
  return el("span", {class: "badge st-" + status, id: id, text: status.replace("_", " ")});
}

function banner(text) {
  const b = document.getElementById("banner");
  b.hidden = !text;
  b.textContent = text || "";
}

async function getJSON(url) {
  const resp = await fetch(url, {headers: {"Accept": "application/json"}});
  const body = await resp.json().catch(() => ({error: resp.status + " " + resp.statusText}));
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

async function post(url, payload) {
  const resp = await fetch(url, {method: "POST", body: JSON.stringify(payload || {}),
                                 headers: {"Content-Type": "application/json", "X-Dagcraft-Token": TOKEN}});
  const body = await resp.json().catch(() => ({error: resp.status + " " + resp.statusText}));
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function poller(fn) {
  // one request at a time; the next is scheduled when this one settles
  let timer = null;
  const tick = async () => {
    let delay = POLL_MS;
    try {
      delay = (await fn()) || POLL_MS;
      banner("");
      document.getElementById("live").className = "live on";
    } catch (err) {
      banner("cannot refresh: " + err.message);
      document.getElementById("live").className = "live off";
    }
    timer = setTimeout(tick, delay);
  };
  tick();
  return {now() { clearTimeout(timer); tick(); }};
}

// ---- the run list ---------------------------------------------------------------------------
function runsPage(main) {
  document.title = "dagcraft runs";
  const body = el("tbody", {id: "runs"});
  const empty = el("p", {class: "muted", hidden: true,
                         text: "No runs in this store yet: start one with dagcraft run SPEC."});
  setKids(main, el("h1", {text: "Runs"}), el("table", {class: "grid"},
    el("thead", {}, el("tr", {}, ["Run", "Workflow", "Status", "Age", "Duration", "Reason"].map(
      (h) => el("th", {text: h})))), body), empty);
  poller(async () => {
    const data = await getJSON("/api/runs");
    document.getElementById("store").textContent = data.store;
    empty.hidden = data.runs.length > 0;
    setKids(body, ...data.runs.map((r) => el("tr", {"data-run": r.run_id, class: "st-" + r.status},
      el("td", {}, el("a", {href: "/runs/" + encodeURIComponent(r.run_id), text: r.run_id})),
      el("td", {text: r.name}),
      el("td", {}, badge(r.status)),
      el("td", {title: fmtTime(r.submitted_at), text: fmtAge(r.age_s)}),
      el("td", {text: fmtDur(r.duration_s)}),
      el("td", {class: "reason", text: r.reason || ""}))));
    return 2 * POLL_MS;
  });
}

// ---- a run ----------------------------------------------------------------------------------
function runPage(main, runId) {
  document.title = runId + " · dagcraft";
  const api = "/api/runs/" + encodeURIComponent(runId);
  const state = {selected: null, attempt: null, run: null, stepTimer: null};
  const head = el("div", {class: "runhead"});
  const actions = el("div", {class: "actions", id: "run-actions"});
  const message = el("div", {class: "message", id: "message"});
  const dag = el("div", {class: "dag", id: "dag"});
  const timeline = el("div", {class: "timeline", id: "timeline"});
  const steps = el("tbody", {id: "steps"});
  const detail = el("section", {class: "detail", id: "detail", hidden: true});
  setKids(main,
    el("p", {class: "crumbs"}, el("a", {href: "/", text: "← all runs"})),
    head, actions, message,
    el("h2", {text: "Graph"}), dag,
    el("h2", {text: "Timeline"}), timeline,
    el("h2", {text: "Steps"}),
    el("table", {class: "grid"}, el("thead", {}, el("tr", {},
      ["Step", "Status", "Attempt", "Duration", "Worker", "Reason", ""].map((h) => el("th", {text: h})))), steps),
    detail);

  async function act(name, step) {
    message.textContent = name + "…";
    message.className = "message";
    try {
      const res = await post(api + "/actions/" + name, step ? {step} : {});
      message.textContent = name + ": " + (res.message || res.status);
    } catch (err) {
      message.textContent = name + " refused: " + err.message;
      message.className = "message error";
    }
    runPoll.now();
  }

  function actionButtons(names, step) {
    return names.map((a) => el("button", {class: "btn btn-" + a, "data-action": a, text: LABELS[a] || a,
                                          onclick: () => act(a, step)}));
  }

  function select(stepId, attempt) {
    state.selected = stepId;
    state.attempt = attempt || null;
    for (const row of steps.querySelectorAll("tr[data-step]")) row.classList.toggle("sel", row.dataset.step === stepId);
    for (const g of dag.querySelectorAll("g[data-step]")) g.classList.toggle("sel", g.dataset.step === stepId);
    stepPoll();
  }

  async function stepPoll() {
    clearTimeout(state.stepTimer);
    if (!state.selected) return;
    const wanted = state.selected;
    try {
      const q = state.attempt ? "?attempt=" + encodeURIComponent(state.attempt) : "";
      const s = await getJSON(api + "/steps/" + encodeURIComponent(wanted) + q);
      if (wanted === state.selected) renderDetail(s);
    } catch (err) {
      detail.hidden = false;
      setKids(detail, el("p", {class: "error", text: err.message}));
    }
    const live = state.run && !FINISHED.has(state.run.status);
    state.stepTimer = setTimeout(stepPoll, live ? POLL_MS : POLL_DONE_MS);
  }

  function pre(title, log, cls) {
    if (!log) return el("div", {class: "log"}, el("h4", {text: title}), el("p", {class: "muted", text: "(nothing yet)"}));
    const note = log.truncated ? " (last lines of " + log.bytes + " bytes)" : "";
    return el("div", {class: "log"}, el("h4", {text: title + note}),
              log.text ? el("pre", {class: cls, text: log.text}) : el("p", {class: "muted", text: "(empty)"}));
  }

  function renderDetail(s) {
    detail.hidden = false;
    const attempts = el("ul", {class: "attempts"}, s.attempts.map((a) => el("li", {},
      el("a", {href: "#", class: a.name === s.attempt ? "cur" : "", onclick: (e) => { e.preventDefault(); select(s.step, a.name); }},
         (a.kind === "rollback" ? "rollback " : "attempt ") + a.attempt),
      " ", badge(a.status), " ", el("span", {class: "muted", text: fmtDur(a.finished_at && a.started_at ?
        a.finished_at - a.started_at : (a.started_at && state.run ? state.run.now - a.started_at : null))}),
      a.worker ? el("span", {class: "muted", text: " on " + a.worker}) : null,
      a.exit_code !== null && a.exit_code !== undefined ? el("span", {class: "muted", text: " · exit " + a.exit_code}) : null,
      a.reason ? el("div", {class: "reason", text: a.reason}) : null)));
    const outputs = Object.keys(s.outputs || {}).length ?
      el("pre", {class: "json", text: JSON.stringify(s.outputs, null, 2)}) : el("p", {class: "muted", text: "(none)"});
    const arts = s.artifacts.length ? el("ul", {class: "artifacts"}, s.artifacts.map((a) => el("li", {},
      el("a", {href: a.url, download: a.name.split("/").pop(), text: a.name}),
      el("span", {class: "muted", text: " " + a.size + " bytes · " + (a.digest || "").slice(0, 19)})))) :
      el("p", {class: "muted", text: "(none)"});
    const events = s.trace.events.length ? el("table", {class: "grid events"}, el("tbody", {},
      s.trace.events.map((ev) => el("tr", {}, el("td", {class: "muted", text: new Date(ev.ts_ms).toLocaleTimeString()}),
        el("td", {class: "kind", text: ev.kind}), el("td", {text: ev.text}))))) :
      el("p", {class: "muted", text: "(no trace yet: it is uploaded when the attempt ends)"});
    const more = s.trace.total > s.trace.events.length ?
      el("p", {class: "muted", text: "first " + s.trace.events.length + " of " + s.trace.total + " events"}) : null;
    setKids(detail,
      el("h2", {}, "Step ", el("code", {text: s.step}), " ", badge(s.status, "detail-status")),
      s.reason ? el("p", {class: "reason", text: s.reason}) : null,
      el("div", {class: "cols"},
        el("div", {}, el("h3", {text: "Attempts"}), s.attempts.length ? attempts : el("p", {class: "muted", text: "(not started)"})),
        el("div", {}, el("h3", {text: "Outputs"}), outputs, el("h3", {text: "Artifacts"}), arts)),
      el("h3", {text: s.attempt ? "Logs of attempt " + s.attempt : "Logs"}),
      el("div", {class: "cols"}, pre("stderr", s.stderr, "stderr"), pre("stdout", s.stdout, "stdout")),
      el("h3", {text: "Trace events"}), events, more);
  }

  function renderHead(r) {
    const queue = r.timeline.queue_s;
    setKids(head,
      el("h1", {}, el("code", {text: r.run_id}), " ", badge(r.status, "run-status")),
      el("p", {class: "muted"},
        r.name + " · submitted " + fmtAge(r.age_s) + " by " + r.submitted_by +
        " · duration " + fmtDur(r.duration_s) + (queue !== null ? " · waited " + fmtDur(queue) + " for a worker" : "")),
      r.reason ? el("p", {class: "reason", id: "run-reason", text: r.reason}) : null,
      r.ui_workers ? el("p", {class: "muted", text: "workers started by this UI: " + r.ui_workers}) : null);
    setKids(actions, ...actionButtons(r.actions, null));
    // on a run still open, "resume" starts workers here for it (one whose workers are gone)
    const resume = actions.querySelector('button[data-action="resume"]');
    if (resume && !FINISHED.has(r.status)) {
      resume.textContent = "Start workers here";
      resume.title = "start " + "local workers for this run (for a run nobody serves any more)";
    }
  }

  function renderDag(r) {
    for (const s of r.steps) {
      const g = dag.querySelector('g[data-step="' + CSS.escape(s.step) + '"]');
      if (!g) continue;
      for (const c of [...g.classList]) if (c.startsWith("st-")) g.classList.remove(c);
      g.classList.add("st-" + s.status);
      const sub = g.querySelector(".dc-sub");
      if (!sub) continue;
      if (s.children && s.children.length) {
        // a fan-out parent: its children run in its place, so say how far they are
        const kids = r.steps.filter((c) => c.parent === s.step);
        const done = kids.filter((c) => FINISHED.has(c.status) || c.status === "skipped").length;
        const failed = kids.filter((c) => c.status === "failed").length;
        sub.textContent = done + "/" + kids.length + " done" + (failed ? " · " + failed + " failed" : "");
      } else {
        sub.textContent = s.status + (s.attempt > 1 ? " · attempt " + s.attempt : "") +
          (s.duration_s !== null ? " · " + fmtDur(s.duration_s) : "");
      }
    }
  }

  function renderTimeline(r) {
    const t = r.timeline;
    if (!t.bars.length) {
      setKids(timeline, el("p", {class: "muted", text: "No step has started yet."}));
      return;
    }
    const span = Math.max(t.span_s, 0.001);
    const rows = t.bars.map((b) => {
      return el("div", {class: "trow", "data-step": b.step},
        el("div", {class: "tlabel", title: b.step + " attempt " + b.attempt, text: b.step + (b.attempt !== "1" ? " #" + b.attempt : "")}),
        el("div", {class: "track"}, el("div", {class: "bar st-" + b.status,
          title: b.step + " · " + b.status + " · " + fmtDur(b.duration_s)})),
        el("div", {class: "tdur", text: fmtDur(b.duration_s)}));
    });
    // positions go through the CSSOM (the page's CSP forbids style attributes)
    rows.forEach((row, i) => {
      const bar = row.querySelector(".bar");
      bar.style.left = (100 * t.bars[i].offset_s / span) + "%";
      bar.style.width = Math.max(0.4, 100 * t.bars[i].duration_s / span) + "%";
    });
    setKids(timeline,
      el("div", {class: "tscale"}, el("span", {text: "first claim " + fmtTime(t.first_claim)}),
         el("span", {text: "+" + fmtDur(t.span_s)})), ...rows);
  }

  function renderSteps(r) {
    setKids(steps, ...r.steps.map((s) => el("tr", {"data-step": s.step,
        class: "st-" + s.status + (s.parent ? " child" : "") + (s.step === state.selected ? " sel" : ""),
        onclick: (e) => { if (e.target.tagName !== "BUTTON") select(s.step); }},
      el("td", {}, el("code", {text: s.step})),
      el("td", {}, badge(s.status)),
      el("td", {text: s.attempt || ""}),
      el("td", {text: fmtDur(s.duration_s)}),
      el("td", {class: "muted", text: s.worker || (s.attempts.length ? s.attempts[s.attempts.length - 1].worker || "" : "")}),
      el("td", {class: "reason", text: s.status === "succeeded" ? "" : (s.reason || "")}),
      el("td", {}, actionButtons(s.actions, s.step)))));
  }

  let dagLoaded = false;
  async function loadDag() {
    const resp = await fetch(api + "/dag.svg");
    if (!resp.ok) throw new Error("graph: " + resp.status);
    const doc = new DOMParser().parseFromString(await resp.text(), "image/svg+xml");
    const svg = document.importNode(doc.documentElement, true);
    svg.addEventListener("click", (e) => {
      const g = e.target.closest("g[data-step]");
      if (g) select(g.dataset.step);
    });
    setKids(dag, svg);
    dagLoaded = true;
  }

  const runPoll = poller(async () => {
    const r = await getJSON(api);
    state.run = r;
    document.getElementById("store").textContent = "";
    if (!dagLoaded) await loadDag();
    renderHead(r);
    renderDag(r);
    renderTimeline(r);
    renderSteps(r);
    if (!state.selected) {
      const pick = r.steps.find((s) => s.status === "failed") || r.steps.find((s) => s.status === "running");
      if (pick) select(pick.step);
    }
    return FINISHED.has(r.status) ? POLL_DONE_MS : POLL_MS;
  });
}

const main = document.getElementById("main");
const m = location.pathname.match(/^\/runs\/([^/]+)$/);
if (m) runPage(main, decodeURIComponent(m[1]));
else runsPage(main);
