"""A moto S3 server whose WSGI app handles ONE request at a time (run as a subprocess).

Stock moto's conditional-write check is not atomic under concurrent requests (it checks, then
writes), so concurrency tests against it would see false double winners. Serializing every
request behind one lock gives the atomicity real S3 provides. Prints the bound port on stdout,
exits when its stdin is closed (so it never outlives the test session).
"""

from __future__ import annotations

import logging
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


def serialized(app):
    lock = threading.Lock()

    def wrapped(environ, start_response):
        with lock:
            result = app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()
        return [body]

    return wrapped


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    app = serialized(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.shutdown()


if __name__ == "__main__":
    main()
