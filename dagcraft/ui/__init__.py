"""``dagcraft ui``: a live web UI over a store (local or S3), served on this machine.

- :mod:`dagcraft.ui.data` reads the store through the orchestrator's functions (``run_status``,
  ``list_runs``, step states) and shapes JSON for the page; it never writes.
- :mod:`dagcraft.ui.server` is the Starlette app: the page, its JSON endpoints, artifact
  downloads through the run's artifact pointers only, and the state-changing actions (cancel,
  retry from a step, resume), each guarded by a per-session token and an origin check.
- ``static/`` holds the page, its script and stylesheet: no external resource of any kind.

See ``docs/operations.md`` ("Watching runs").
"""

from dagcraft.ui.server import UiOptions, create_app, serve

__all__ = ["UiOptions", "create_app", "serve"]
