"""A small, conservative bash lexer: where does each ``${{ }}`` of a ``run:`` script sit?

A shell-string template never has its values pasted into the script. Each ``${{ }}`` value is
passed to bash as an environment variable (``DAGCRAFT_V_1``, ``DAGCRAFT_V_2``, …) and the
script gets a *reference* to that variable written for the lexical context the ``${{ }}`` sits
in (see :func:`reference`). bash expands a variable reference exactly once and never re-reads
the result as code, so the value arrives as literal data whatever it contains.

Guarantees:
- :func:`analyze` returns one :class:`Slot` per ``${{ }}``, or raises :class:`ShellRefused`
  naming the context when no reference there can be made safe: backticks, ``$(( ))``/``(( ))``/
  ``$[ ]``, ``[[ ]]`` with arithmetic or ``-v`` operators, parameter-expansion operators
  (``${x:-${{ … }}}``), array subscripts and compound assignments, a quoted-delimiter heredoc,
  ``$"…"``, right after ``\\`` or ``$``, the command name, the arguments of ``eval``, ``source``/
  ``.``, ``trap``, ``alias``, ``let``, shells (``sh -c``, ``bash -c``, …) and command-running
  wrappers (``exec``, ``env``, ``xargs``, ``sudo``, ``ssh``, ``find -exec`` …), builtins that
  take variable names (``read``, ``unset``, ``printf -v``, ``declare -n/-i`` …), a pipe or
  here-string into a shell; and, following values through variables (assignments, loops,
  ``read``): a variable later used in arithmetic, as a variable name or run as code, a special
  variable (``PS4``, ``BASH_ENV``, ``PATH`` …), and any value in a script that writes a file and
  then runs it;
- it is conservative: syntax it does not understand (an unterminated quote, an unknown
  construct) is refused, never guessed;
- a script without ``${{ }}`` is never analysed (nothing can be injected into it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

#: the placeholder a ``${{ }}`` is replaced by while lexing (NUL cannot occur in a spec)
SENTINEL = "\x00"
VAR_PREFIX = "DAGCRAFT_V_"


class ShellContext(str, Enum):
    """Where a ``${{ }}`` sits; decides the form of its reference."""

    BARE = "bare word"
    DQUOTE = "double quotes"
    SQUOTE = "single quotes"
    ANSI = "$'...' quotes"
    HEREDOC = "heredoc body"
    COMMENT = "comment"


@dataclass(frozen=True)
class Slot:
    """The ``index``-th ``${{ }}`` (0-based) and its context."""

    index: int
    context: ShellContext


class ShellRefused(ValueError):
    """A ``${{ }}`` in a context where no reference can be made safe. ``offset`` is the
    position in the original script (of the ``${{`` when one is at fault)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def var_name(index: int) -> str:
    """The environment variable carrying the value of the ``index``-th (0-based) ``${{ }}``."""
    return f"{VAR_PREFIX}{index + 1}"


def reference(context: ShellContext, name: str) -> str:
    """The script text that expands to the literal value of ``$name`` in ``context``."""
    if context is ShellContext.BARE:
        return f'"${{{name}}}"'
    if context in (ShellContext.DQUOTE, ShellContext.HEREDOC):
        return f"${{{name}}}"
    if context is ShellContext.SQUOTE:
        return f"'\"${{{name}}}\"'"
    if context is ShellContext.ANSI:
        return f"'\"${{{name}}}\"$'"
    return name  # a comment: any text is inert


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\+?=")
_META = set(" \t\n;&|()<>")
_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "time", "esac"}
_CODE = {"eval", "source", ".", "trap", "alias", "let", "coproc", "fc", "complete", "compgen", "bind", "enable",
         "hash"}
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "busybox", "fish", "csh", "tcsh", "rbash", "yash", "posh"}
_WRAPPERS = {"exec", "command", "builtin", "env", "nohup", "nice", "time", "timeout", "sudo", "doas", "su",
             "runuser", "xargs", "stdbuf", "chroot", "setsid", "watch", "parallel", "ssh", "nsenter", "unshare",
             "flock", "strace", "ltrace", "ionice", "taskset", "script", "chrt", "caffeinate", "unbuffer"}
_NAME_BUILTINS = {"unset", "read", "mapfile", "readarray", "getopts"}
_DECLARE = {"declare", "typeset", "local", "export", "readonly"}
_FIND_EXEC = {"-exec", "-execdir", "-ok", "-okdir"}
_ARITH_COND = {"-eq", "-ne", "-lt", "-le", "-gt", "-ge", "-v", "-R"}
#: read a program from stdin when given no script argument
#: variables whose value bash (or a program it starts) runs or uses to find code
SPECIAL_VARS = {
    "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PATH", "IFS",
    "BASH_CMDS", "BASH_ALIASES", "BASH_LOADABLES_PATH", "BASH_XTRACEFD", "LD_PRELOAD", "LD_LIBRARY_PATH",
    "LD_AUDIT", "NODE_OPTIONS", "PYTHONPATH", "PYTHONSTARTUP", "PERL5OPT", "PERL5LIB", "RUBYOPT",
    "GIT_SSH_COMMAND", "GIT_SSH", "GIT_EXTERNAL_DIFF", "GIT_PAGER", "GIT_EDITOR", "GIT_ASKPASS",
    "GIT_CONFIG_PARAMETERS", "PAGER", "EDITOR", "VISUAL", "LESSOPEN", "BROWSER", "SSH_ASKPASS", "SUDO_ASKPASS",
}
_INTERPRETERS = {"python", "python3", "python2", "perl", "ruby", "node", "php", "lua", "tclsh", "Rscript", "osascript"}


@dataclass
class _Word:
    """One shell word as lexed: enough to tell a command name, an assignment or an option."""

    start: int
    text: str = ""  # its literal characters (quotes removed, slots as SENTINEL, expansions dropped)
    dynamic: bool = False  # contains an expansion of its own ($x, $(...), ...)
    slots: list[tuple[int, int]] = field(default_factory=list)  # (slot index, position in s)
    value_slots: set[int] = field(default_factory=set)  # slots after the `=` of NAME=
    assign: str | None = None  # NAME when the word has the NAME= form
    redirect: bool = False  # a redirection target (never a command or its argument)
    raw: str = ""  # the word as written


@dataclass
class _Cmd:
    """One simple command: its words, and what the checks learnt about it."""

    words: list[_Word] = field(default_factory=list)
    danger: str | None = None  # why anything fed to this command may run as code
    base: str = ""  # the command's name without its directory
    slot_pos: list[int] = field(default_factory=list)  # every ${{ }} in it (arguments, redirects, $( ))
    pipeline: list[_Cmd] = field(default_factory=list)  # the pipeline it is part of (shared)


class _Lexer:
    """Recursive descent over the script with every ``${{ }}`` replaced by SENTINEL; records
    the context of each SENTINEL, raises ShellRefused for an unsafe or unknown one."""

    def __init__(self, s: str, spans: list[tuple[int, int]]) -> None:
        self.s = s
        self.n = len(s)
        self.i = 0
        self.offsets = [a for a, _ in spans]  # original offset of each sentinel
        self.ends = [b for _, b in spans]
        self.sentinel_pos = [k for k, c in enumerate(s) if c == SENTINEL]
        self.slot_of = {p: k for k, p in enumerate(self.sentinel_pos)}
        self.contexts: dict[int, ShellContext] = {}
        self.pending_heredocs: list[tuple[str, bool, bool, int, _Cmd]] = []
        self.arith: list[str] = []  # text of arithmetic contexts (for the data-flow check)
        self.assigns: list[tuple[str, str, list[int]]] = []  # (name, value text, slots in it)
        self.code: list[str] = []  # text that a command runs as code (for the data-flow check)
        self.names: list[str] = []  # words used as variable names (`read "$x"`, `unset "$x"`)
        self.written: set[str] = set()  # files the script writes with a redirection
        self.runs_written = False  # ... and then runs as code (source f, bash f)
        self.word: _Word | None = None

    # ------------------------------------------------------------------ helpers
    def orig(self, pos: int) -> int:
        """Offset in the original script of position ``pos`` of the lexed string."""
        before = [k for k, p in enumerate(self.sentinel_pos) if p < pos]
        if not before:
            return pos
        k = before[-1]
        return self.ends[k] + (pos - self.sentinel_pos[k] - 1)

    def refuse(self, why: str, pos: int) -> ShellRefused:
        if pos in self.slot_of:
            return ShellRefused(f"${{{{ }}}} {why}", self.offsets[self.slot_of[pos]])
        return ShellRefused(why, self.orig(pos))

    def slots_in(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(self.slot_of[p], p) for p in self.sentinel_pos if start <= p < end]

    def refuse_inside(self, start: int, end: int, what: str) -> None:
        for p in self.sentinel_pos:
            if start <= p < end:
                raise self.refuse(f"inside {what}: no reference there can be made safe", p)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < self.n else ""

    def slot(self, ctx: ShellContext) -> None:
        pos = self.i
        self.contexts[self.slot_of[pos]] = ctx
        if self.word is not None:
            self.word.slots.append((self.slot_of[pos], pos))
            self.word.text += SENTINEL
            if self.word.assign is not None:
                self.word.value_slots.add(self.slot_of[pos])
        self.i += 1

    # ------------------------------------------------------------------ scanning primitives
    def skip_squote(self, ctx: ShellContext | None = ShellContext.SQUOTE, ansi: bool = False) -> None:
        start = self.i
        while self.i < self.n:
            c = self.s[self.i]
            if c == "'":
                self.i += 1
                return
            if ansi and c == "\\":
                if self.peek(1) == SENTINEL:
                    raise self.refuse("after a backslash", self.i + 1)
                self.i += 2
                continue
            if c == SENTINEL:
                if ctx is None:
                    raise self.refuse("inside $\"...\"", self.i)
                self.slot(ctx)
                continue
            if self.word is not None:
                self.word.text += c
            self.i += 1
        raise self.refuse("unterminated single quote", start)

    def skip_backticks(self) -> None:
        start = self.i
        self.i += 1
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\":
                self.i += 2
                continue
            if c == "`":
                self.i += 1
                self.refuse_inside(start, self.i, "backticks `...`")
                return
            self.i += 1
        raise self.refuse("unterminated backtick", start)

    def skip_balanced(self, start: int, open_c: str, close_c: str, what: str) -> str:
        """From just after an opening bracket to its match; refuses any ${{ }} inside. Quotes
        and escapes are skipped so a bracket inside them does not count."""
        depth = 1
        body_start = self.i
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\":
                self.i += 2
                continue
            if c == "'":
                j = self.s.find("'", self.i + 1)
                if j < 0:
                    break
                self.i = j + 1
                continue
            if c == '"':
                self.i += 1
                while self.i < self.n and self.s[self.i] != '"':
                    self.i += 2 if self.s[self.i] == "\\" else 1
                self.i += 1
                continue
            if c == open_c:
                depth += 1
            elif c == close_c:
                depth -= 1
                if depth == 0:
                    body = self.s[body_start:self.i]
                    self.i += 1
                    self.refuse_inside(start, self.i, what)
                    return body
            self.i += 1
        raise self.refuse(f"unterminated {what}", start)

    def dollar(self, in_dquote: bool) -> None:
        start = self.i
        nxt = self.peek(1)
        if self.word is not None:
            self.word.dynamic = True
        if nxt == SENTINEL:
            raise self.refuse("right after '$'", self.i + 1)
        if nxt == "(" and self.peek(2) == "(":
            self.i += 3
            body = self.skip_balanced(start, "(", ")", "arithmetic $(( ))")
            self.arith.append(body)
            if self.peek() != ")":
                raise self.refuse("unterminated arithmetic $(( ))", start)
            self.i += 1
            return
        if nxt == "(":
            self.i += 2
            saved = self.word
            self.word = None
            self.parse_list(end=")")
            self.word = saved
            if saved is not None:  # the output of $( ) becomes part of the enclosing word
                for idx, p in self.slots_in(start, self.i):
                    saved.slots.append((idx, p))
                    if saved.assign is not None:
                        saved.value_slots.add(idx)
            return
        if nxt == "{":
            self.i += 2
            body = self.skip_balanced(start, "{", "}", "parameter expansion ${...}")
            m = re.match(r"[#!]?([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-])", body)
            rest = body[m.end():] if m else body
            if rest or body.startswith("!"):  # operators, subscripts; ${!x} looks up x's value as a name
                self.arith.append(body)
            if VAR_PREFIX in body:
                raise self.refuse(f"{VAR_PREFIX}* variables are reserved for template values", start)
            return
        if nxt == "[":
            self.i += 2
            self.arith.append(self.skip_balanced(start, "[", "]", "arithmetic $[ ]"))
            return
        if nxt == "'" and not in_dquote:
            self.i += 2
            self.skip_squote(ShellContext.ANSI, ansi=True)
            return
        if nxt == '"' and not in_dquote:
            self.i += 2
            self.dquote(locale=True)
            return
        self.i += 1
        m = _IDENT.match(self.s, self.i)
        if m:
            if m.group().startswith(VAR_PREFIX):
                raise self.refuse(f"{VAR_PREFIX}* variables are reserved for template values", start)
            self.i = m.end()
        elif self.i < self.n and (self.s[self.i].isdigit() or self.s[self.i] in "@*#?$!-"):
            self.i += 1
        elif self.word is not None:
            self.word.text += "$"

    def dquote(self, locale: bool = False) -> None:
        start = self.i - 1
        while self.i < self.n:
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return
            if c == "\\":
                if self.peek(1) == SENTINEL:
                    raise self.refuse("right after a backslash", self.i + 1)
                if self.word is not None:
                    self.word.text += self.peek(1)
                self.i += 2
                continue
            if c == "$":
                self.dollar(in_dquote=True)
                continue
            if c == "`":
                self.skip_backticks()
                continue
            if c == SENTINEL:
                if locale:
                    raise self.refuse('inside $"..." (translated strings)', self.i)
                self.slot(ShellContext.DQUOTE)
                continue
            if self.word is not None:
                self.word.text += c
            self.i += 1
        raise self.refuse("unterminated double quote", start)

    # ------------------------------------------------------------------ words and commands
    def read_word(self) -> _Word:
        w = _Word(start=self.i)
        self.word = w
        while self.i < self.n:
            c = self.s[self.i]
            if c in _META:
                if c == "(" and w.text and w.text[-1] in "@!+*?" and not w.dynamic:
                    self.i += 1
                    self.skip_balanced(self.i - 1, "(", ")", "an extended glob")
                    w.dynamic = True
                    continue
                break
            if c == "\\":
                nxt = self.peek(1)
                if nxt == SENTINEL:
                    raise self.refuse("right after a backslash", self.i + 1)
                if nxt == "\n":
                    self.i += 2
                    continue
                w.text += nxt
                self.i += 2
                continue
            if c == "'":
                self.i += 1
                self.skip_squote()
                continue
            if c == '"':
                self.i += 1
                self.dquote()
                continue
            if c == "$":
                self.dollar(in_dquote=False)
                continue
            if c == "`":
                w.dynamic = True
                self.skip_backticks()
                continue
            if c == SENTINEL:
                if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\[[^\]]*$", w.text):
                    raise self.refuse("inside an array subscript (evaluated as arithmetic)", self.i)
                self.slot(ShellContext.BARE)
                continue
            if c == "=" and w.assign is None and _IDENT.fullmatch(w.text.rstrip("+")) and not w.dynamic:
                w.assign = w.text.rstrip("+")
                w.text += c
                self.i += 1
                if self.peek() == "(":
                    self.i += 1
                    # `[sub]=v` keys of an array literal are arithmetic
                    self.arith.append(self.skip_balanced(self.i - 1, "(", ")", "a compound (array) assignment"))
                    w.dynamic = True
                continue
            if c == "=" and w.assign is None and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\[.*\]\+?", w.text):
                # arr[i]=value: the subscript is arithmetic
                self.arith.append(w.text)
                w.assign = w.text.split("[", 1)[0]
            w.text += c
            self.i += 1
        self.word = None
        w.raw = self.s[w.start:self.i]
        return w

    def skip_blank(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t":
            self.i += 1
        if self.peek() == "\\" and self.peek(1) == "\n":
            self.i += 2
            self.skip_blank()

    def comment(self) -> None:
        while self.i < self.n and self.s[self.i] != "\n":
            if self.s[self.i] == SENTINEL:
                self.contexts[self.slot_of[self.i]] = ShellContext.COMMENT
            self.i += 1

    def redirect_op(self) -> str | None:
        for op in ("<<<", "<<-", "&>>", "<<", ">>", "<&", ">&", "&>", "<>", ">|", "<", ">"):
            if self.s.startswith(op, self.i):
                if op in ("<", ">") and self.peek(1) == "(":
                    return None  # process substitution
                return op
        return None

    def heredoc_delim(self, strip: bool, cmd: _Cmd) -> None:
        self.skip_blank()
        start = self.i
        w = self.read_word()
        raw = self.s[start:self.i]
        if w.slots:
            raise self.refuse("in a heredoc delimiter", w.slots[0][1])
        if not raw:
            raise self.refuse("a heredoc without a delimiter", start)
        quoted = any(q in raw for q in "'\"\\")
        self.pending_heredocs.append((w.text, quoted, strip, start, cmd))

    def heredoc_bodies(self) -> None:
        for delim, quoted, strip, start, cmd in self.pending_heredocs:
            body_start = self.i
            while True:
                if self.i >= self.n:
                    raise self.refuse(f"unterminated heredoc (no line {delim!r})", start)
                j = self.s.find("\n", self.i)
                j = self.n if j < 0 else j
                line = self.s[self.i:j]
                if (line.lstrip("\t") if strip else line) == delim:
                    body_end = self.i
                    self.i = min(j + 1, self.n)
                    break
                self.i = j + 1
            if quoted:
                self.refuse_inside(body_start, body_end, f"a quoted-delimiter heredoc (<<'{delim}'), which expands nothing")
                continue
            for fed_cmd in cmd.pipeline or [cmd]:
                if fed_cmd.danger:
                    self.code.append(self.s[body_start:body_end])
                    self.refuse_inside(body_start, body_end, f"a heredoc fed to a command where {fed_cmd.danger}")
            saved_i, saved_n = self.i, self.n
            self.i, self.n = body_start, body_end
            while self.i < self.n:
                c = self.s[self.i]
                if c == "\\":
                    if self.peek(1) == SENTINEL:
                        raise self.refuse("right after a backslash", self.i + 1)
                    self.i += 2
                elif c == "$":
                    self.dollar(in_dquote=True)
                elif c == "`":
                    self.skip_backticks()
                elif c == SENTINEL:
                    self.slot(ShellContext.HEREDOC)
                else:
                    self.i += 1
            self.i, self.n = saved_i, saved_n
        self.pending_heredocs = []

    def parse_list(self, end: str | None) -> None:
        """Commands until ``end`` (``)``) or the end of input."""
        start = self.i
        cmd = _Cmd()
        pipeline: list[_Cmd] = []

        def finish(c: _Cmd, piped: bool = False) -> None:
            nonlocal pipeline
            self.end_command(c)
            c.pipeline = pipeline
            pipeline.append(c)
            if not piped:
                self.check_pipeline(pipeline)
                pipeline = []

        mode = "cmd"  # cmd | for-name | for-words | case-word | case-pattern | cond
        for_name = ""
        case_depth: list[str] = []
        while True:
            self.skip_blank()
            if self.i >= self.n:
                if end is not None:
                    raise self.refuse("unterminated '$(' or '('", start)
                finish(cmd)
                if self.pending_heredocs:
                    raise self.refuse("unterminated heredoc", self.pending_heredocs[0][3])
                return
            c = self.s[self.i]
            if c == "#":  # at the start of a word: a comment
                self.comment()
                continue
            if c == "\n":
                finish(cmd)
                cmd = _Cmd()
                self.i += 1
                if self.pending_heredocs:
                    self.heredoc_bodies()
                if mode in ("for-words", "case-word"):
                    mode = "cmd" if mode == "for-words" else mode
                continue
            if mode == "cond":
                if self.s.startswith("]]", self.i) and (self.i + 2 >= self.n or self.s[self.i + 2] in _META):
                    self.i += 2
                    self.end_cond(cmd)
                    mode = "cmd"
                    continue
                if c in "()<>&|!":
                    self.i += 1
                    continue
                w = self.read_word()
                if self.i == w.start:
                    raise self.refuse(f"unexpected {c!r} inside [[ ]]", self.i)
                cmd.words.append(w)
                continue
            if c == ")":
                if case_depth and mode == "case-pattern":
                    self.i += 1
                    mode = "cmd"
                    continue
                if end == ")":
                    finish(cmd)
                    self.i += 1
                    return
                raise self.refuse("unbalanced ')'", self.i)
            if c in ";&|" and not self.s.startswith("&>", self.i):
                finish(cmd, piped=c == "|" and not self.s.startswith("||", self.i))
                cmd = _Cmd()
                if case_depth and (self.s.startswith(";;", self.i) or self.s.startswith(";&", self.i)):
                    self.i += 3 if self.s.startswith(";;&", self.i) else 2
                    mode = "case-pattern"
                    continue
                self.i += 2 if self.s[self.i:self.i + 2] in ("&&", "||", "|&") else 1
                if mode in ("for-words", "for-name"):
                    mode = "cmd"
                continue
            op = self.redirect_op()
            if op is not None:
                self.i += len(op)
                if op in ("<<", "<<-"):
                    self.heredoc_delim(strip=op == "<<-", cmd=cmd)
                else:
                    self.skip_blank()
                    w = self.read_word()
                    w.redirect = True
                    cmd.words.append(w)
                    if op in (">", ">>", ">|", "&>", "&>>") and not w.dynamic and not w.slots:
                        self.written.add(w.text.removeprefix("./"))
                continue
            if c in "<>" and self.peek(1) == "(":
                st = self.i
                self.i += 2
                self.parse_list(end=")")
                # a process substitution is an argument whose content the command may read
                cmd.words.append(_Word(start=st, dynamic=True, raw=self.s[st:self.i],
                                       slots=self.slots_in(st, self.i)))
                continue
            if c == "(":
                if (not self.has_command(cmd) or mode == "for-name") and self.peek(1) == "(":
                    if mode == "for-name":
                        mode = "for-words"
                    st = self.i
                    self.i += 2
                    body = self.skip_balanced(st, "(", ")", "arithmetic (( ))")
                    self.arith.append(body)
                    if self.peek() != ")":
                        raise self.refuse("unterminated (( ))", st)
                    self.i += 1
                    continue
                if mode == "case-pattern":
                    self.i += 1
                    continue
                if not cmd.words or (len(cmd.words) == 1 and self.peek(1) == ")"):
                    if cmd.words:  # name() function definition
                        self.i += 2
                        if cmd.words[0].slots:
                            raise self.refuse("as a function name", cmd.words[0].slots[0][1])
                        cmd = _Cmd()
                        continue
                    self.i += 1
                    self.parse_list(end=")")
                    continue
                raise self.refuse("unexpected '('", self.i)
            w = self.read_word()
            if self.i == w.start:
                raise self.refuse(f"unexpected {self.s[self.i]!r}", self.i)
            if w.text.isdigit() and self.peek() in ("<", ">"):
                continue  # a file descriptor number: `2>err`
            literal = w.text if not w.slots and not w.dynamic else None
            if mode == "case-word":
                if literal == "in":
                    mode = "case-pattern"
                continue
            if mode == "case-pattern":
                if literal == "esac":
                    case_depth.pop()
                    mode = "cmd"
                continue  # pattern words: bare words are quoted, i.e. matched literally
            if mode == "for-name":
                if w.slots:
                    raise self.refuse("as a loop variable name", w.slots[0][1])
                for_name = w.text
                mode = "for-words"
                continue
            if mode == "for-words":
                if literal == "do":
                    mode = "cmd"
                elif w.slots:  # the loop variable holds the value
                    self.assigns.append((for_name, "", [idx for idx, _ in w.slots]))
                continue
            if not self.has_command(cmd):
                if literal == "esac" and case_depth:
                    case_depth.pop()
                    continue
                if literal in _KEYWORDS:
                    continue
                if literal in ("for", "select"):
                    mode = "for-name"
                    continue
                if literal == "case":
                    case_depth.append("case")
                    mode = "case-word"
                    continue
                if literal == "function":
                    self.skip_blank()
                    fw = self.read_word()
                    if fw.slots:
                        raise self.refuse("as a function name", fw.slots[0][1])
                    continue
                if literal == "[[":
                    mode = "cond"
                    cmd.words.append(w)
                    continue
            cmd.words.append(w)

    @staticmethod
    def has_command(cmd: _Cmd) -> bool:
        """Whether the simple command already has its command word (else: command position)."""
        return any(w.assign is None and not w.redirect for w in cmd.words)

    def end_cond(self, cmd: _Cmd) -> None:
        words = [w.raw for w in cmd.words]
        slots = [p for w in cmd.words for _, p in w.slots]
        if any(t in _ARITH_COND for t in words):
            self.arith.append(" ".join(words))
            if slots:
                raise self.refuse("inside [[ ]] with an arithmetic or -v operator (evaluated as code)", slots[0])

    def check_pipeline(self, pipeline: list[_Cmd]) -> None:
        """A value anywhere upstream of a command that runs its input as code would be run."""
        for k, c in enumerate(pipeline):
            if k and c.base in ("read", "mapfile", "readarray"):  # `… | while read l`: l holds the input
                fed = [self.slot_of[p] for d in pipeline[:k] for p in d.slot_pos]
                for w in c.words[1:]:
                    if fed and not w.text.startswith("-") and _IDENT.fullmatch(w.text):
                        self.assigns.append((w.text, "", fed))
                if not fed:
                    for w in c.words[1:]:
                        self.assigns.append((w.text, " ".join(x.raw for d in pipeline[:k] for x in d.words), []))
            if k and c.danger:
                self.code.extend(w.raw for d in pipeline[:k] for w in d.words)
                earlier = [p for d in pipeline[:k] for p in d.slot_pos]
                if earlier:
                    raise self.refuse(f"piped into a command where {c.danger}", earlier[0])

    @staticmethod
    def danger_of(base: str, args: list[_Word]) -> str | None:
        literals = {w.text for w in args if not w.slots and not w.dynamic}
        if base in _CODE:
            return f"{base!r} runs its arguments as shell code"
        if base in _SHELLS or literals & _SHELLS or "eval" in literals:
            return f"a shell ({base or 'sh'!r} ...) may run its arguments or input as code"
        if base in _WRAPPERS:
            return f"{base!r} may run its arguments as a command"
        if base == "find" and literals & _FIND_EXEC:
            return "'find -exec' may run its arguments"
        if base in _INTERPRETERS and (all(w.text.startswith("-") for w in args) or "-" in literals):
            return f"{base!r} reads its program from stdin"
        return None

    def end_command(self, cmd: _Cmd) -> None:
        words = cmd.words
        if not words:
            return
        cmd.slot_pos = [p for w in words for _, p in w.slots]
        for w in words:
            if w.assign is not None and not w.redirect:
                self.record_assign(w)
        fed = [idx for w in words if w.redirect for idx, _ in w.slots]  # e.g. `read n <<< value`
        fed_pos = [p for w in words if w.redirect for _, p in w.slots]
        words = [w for w in words if not w.redirect]
        k = 0
        while k < len(words) and words[k].assign is not None:
            k += 1
        if k == len(words):
            return
        name_w = words[k]
        args = words[k + 1:]
        slots = [p for w in args for _, p in w.slots]
        if name_w.slots:
            raise self.refuse("as the command name (the value would be run as a command); pass it as an "
                              "argument, or through the step's env", name_w.slots[0][1])
        if name_w.dynamic and (slots or fed_pos):  # `$cmd ${{ x }}`: cmd may be eval
            raise self.refuse("in the arguments of a command whose name is computed (it could be eval)",
                              (slots or fed_pos)[0])
        if name_w.text == "[[":
            return
        name = name_w.text if not name_w.dynamic else ""
        base = name.rsplit("/", 1)[-1]
        cmd.danger = self.danger_of(base, args)
        cmd.base = base
        if base in ("tee", "cp", "mv", "install", "dd", "sponge"):  # commands that write files too
            self.written.update(w.text.removeprefix("./") for w in args if not w.dynamic and not w.text.startswith("-"))
        if cmd.danger and any(w.text.removeprefix("./") in self.written for w in args if not w.dynamic):
            self.runs_written = True
        if base in _NAME_BUILTINS or base in _DECLARE or (base == "printf" and any(w.text.startswith("-v") for w in args)) \
                or (base in ("test", "[") and any(w.text in ("-v", "-R") for w in args)):
            # variable names: a value used as one has its subscript evaluated
            self.names.extend(w.raw.split("=", 1)[0] for w in args)
        if cmd.danger or name_w.dynamic:
            self.code.extend(w.raw for w in cmd.words[k:])
        if fed and base in ("read", "mapfile", "readarray"):
            for w in args:
                if not w.text.startswith("-") and _IDENT.fullmatch(w.text):
                    self.assigns.append((w.text, "", fed))
        if cmd.danger and (slots or fed_pos):
            first = (slots or fed_pos)[0]
            if base in _CODE:
                raise self.refuse(f"in the arguments of {base!r}, which runs them as shell code", first)
            if cmd.danger.startswith("a shell"):
                raise self.refuse(f"in a command that runs a shell ({base or 'sh'!r} ...): its arguments and input "
                                  "may be run as code", first)
            if base in _WRAPPERS:
                raise self.refuse(f"in the arguments of {base!r}, which may run them as a command", first)
            raise self.refuse(f"in a command where {cmd.danger}", first)
        if not slots:
            if base in _DECLARE and any(w.text.startswith("-") and set(w.text) & set("inaA") for w in args):
                for w in args:
                    if not w.text.startswith("-"):
                        self.arith.append(w.raw.split("=", 1)[0])
            if base == "let":
                self.arith.append(" ".join(w.raw for w in args))
            return
        first = slots[0]
        if base in _NAME_BUILTINS:
            raise self.refuse(f"in the arguments of {base!r}, which takes variable names (a subscript would be evaluated)", first)
        if base == "printf" and any(w.text.startswith("-v") for w in args):
            raise self.refuse("in 'printf -v' (a variable name; a subscript would be evaluated)", first)
        literals = {w.text for w in args if not w.slots and not w.dynamic}
        if base in ("test", "[") and literals & {"-v", "-R"}:
            raise self.refuse(f"in '{base} -v' (a variable name; a subscript would be evaluated)", first)
        if base in _DECLARE:
            if any(w.text.startswith(("-", "+")) and set(w.text) & set("inaAf") for w in args if not w.slots):
                raise self.refuse(f"in '{base}' with -i/-n/-a/-A/-f (the value may be evaluated)", first)
            for w in args:
                for idx, p in w.slots:
                    if idx not in w.value_slots:
                        raise self.refuse(f"in a variable name given to {base!r}", p)

    def record_assign(self, w: _Word) -> None:
        assert w.assign is not None
        self.assigns.append((w.assign, w.raw.partition("=")[2], [idx for idx, _ in w.slots]))


def analyze(pieces: list[str], spans: list[tuple[int, int]]) -> list[Slot]:
    """The context of each ``${{ }}`` of a script given as the literal text around them
    (``pieces``: one more than there are ``${{ }}``; ``spans``: where each ``${{ … }}`` starts
    and ends in the original script). Raises :class:`ShellRefused` for an unsafe or unknown
    context."""
    for k, piece in enumerate(pieces):
        if SENTINEL in piece:
            raise ShellRefused("the script contains a NUL byte", spans[k - 1][1] if k else 0)
    offsets = [a for a, _ in spans]
    s = SENTINEL.join(pieces)
    lx = _Lexer(s, spans)
    lx.parse_list(end=None)
    _check_flow(lx)
    missing = [k for k in range(len(pieces) - 1) if k not in lx.contexts]
    if missing:  # every ${{ }} must have been classified; anything else is a lexer gap
        raise ShellRefused("${{ }} in a context the script lexer does not understand", offsets[missing[0]])
    return [Slot(k, lx.contexts[k]) for k in range(len(pieces) - 1)]


def _check_flow(lx: _Lexer) -> None:
    """A variable holding a template value (directly or through other assignments) must not be
    used in arithmetic: bash evaluates a variable's value there as an expression (code)."""
    tainted: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for name, value, slots in lx.assigns:
            if name in tainted:
                continue
            if slots:
                tainted[name] = slots[0]
                changed = True
            elif any(re.search(rf"\b{re.escape(t)}\b", value) for t in tainted):
                src = next(t for t in tainted if re.search(rf"\b{re.escape(t)}\b", value))
                tainted[name] = tainted[src]
                changed = True
    if lx.offsets and lx.runs_written:
        raise ShellRefused("${{ }} in a script that writes a file and then runs it as code (source, sh, ...): "
                           "a template value could reach it", lx.offsets[0])
    if lx.offsets:
        for text in lx.code:
            if re.search(r"\$(\{?[0-9@*]|\{?#)", text):
                raise ShellRefused(f"${{{{ }}}} in a script where {text.strip()[:40]!r} runs positional parameters "
                                   "as code (a function argument could carry a template value)", lx.offsets[0])
    for name, slot in tainted.items():
        if name in SPECIAL_VARS:
            raise ShellRefused(f"${{{{ }}}} assigned to {name}, which bash or the programs it starts use to run "
                               "or find code", lx.offsets[slot])
        for text in lx.code:
            if re.search(rf"\b{re.escape(name)}\b", text):
                raise ShellRefused(f"${{{{ }}}} assigned to {name}, which is run as code ({text.strip()[:40]!r})",
                                   lx.offsets[slot])
        for text in lx.names:
            if re.search(rf"\$\{{?{re.escape(name)}\b", text):
                raise ShellRefused(f"${{{{ }}}} assigned to {name}, whose value is used as a variable name "
                                   f"({text.strip()[:40]!r}): bash would evaluate a subscript in it as code",
                                   lx.offsets[slot])
        for text in lx.arith:
            if re.search(rf"\b{re.escape(name)}\b", text):
                raise ShellRefused(f"${{{{ }}}} assigned to {name}, which is used in arithmetic or an expansion operator "
                                   f"({text.strip()[:40]!r}): bash would evaluate the value as code",
                                   lx.offsets[slot])
