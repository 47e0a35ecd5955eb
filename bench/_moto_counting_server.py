"""tests/moto_server.py's lock-serialized moto S3 server, plus a request counter (bench only).

Same app, same single lock (so conditional writes are atomic, as on real S3); in front of it a
counter of requests by kind (GET, PUT, LIST, HEAD, DELETE, POST) and of 412 answers. The bench
reads and resets the counter with ``GET /__bench_stats__`` (never counted, never reaches moto).
Prints the bound port on stdout; exits when its stdin is closed.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto_server import serialized  # type: ignore  # noqa: E402  (tests/moto_server.py)
from werkzeug.serving import make_server  # noqa: E402

STATS_PATH = "/__bench_stats__"


def counting(app):
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == STATS_PATH:
            with lock:
                body = json.dumps(dict(counts)).encode()
                counts.clear()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        method = environ.get("REQUEST_METHOD", "?")
        query = environ.get("QUERY_STRING", "")
        # path-style: GET /bucket?list-type=2... lists; GET /bucket/key reads an object
        bucket_level = environ.get("PATH_INFO", "/").rstrip("/").count("/") <= 1
        kind = "LIST" if method == "GET" and (bucket_level or "list-type" in query) else method
        status_box: list[str] = []

        def sr(status, headers, exc_info=None):
            status_box.append(status)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = app(environ, sr)
        with lock:
            counts[kind] += 1
            counts["total"] += 1
            if status_box and status_box[0].startswith("412"):
                counts["412"] += 1
        return result

    return wrapped


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = counting(serialized(DomainDispatcherApplication(create_backend_app)))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
