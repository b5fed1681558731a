"""optuna-dashboard on hpo's own storage object, bound to loopback.

optuna-dashboard's command line opens storages from URLs itself, which misses what
`hpo.storage.open_storage` does (Redis key prefixes, Optuna 5.0's Redis journal backend,
password scrubbing). Here it is handed the storage object instead. It listens on
127.0.0.1 by default because it has no authentication: reach it from a laptop through an
ssh tunnel (see the README).
"""

from __future__ import annotations

import sys
from typing import TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.storages import BaseStorage

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class DashboardError(ValueError):
    """One line for the user."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request drowns the one line that matters (the URL)


def server(storage: BaseStorage, *, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A WSGI server running optuna-dashboard on `storage`; call ``serve_forever()``."""
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError("hpo dashboard needs optuna-dashboard: pip install 'hpo[dashboard]'") from None
    app = optuna_dashboard.wsgi(storage)
    try:
        return make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as err:
        raise DashboardError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None


def serve(storage: BaseStorage, study_id: int, *, host: str = "127.0.0.1", port: int = 8080, out: TextIO | None = None) -> None:
    """Serves until Ctrl-C, after printing where to look."""
    out = out or sys.stdout
    httpd = server(storage, host=host, port=port)
    bound = httpd.server_address[1]
    print(f"optuna-dashboard on http://{host}:{bound}/dashboard/studies/{study_id} (Ctrl-C to stop)", file=out, flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this port sees and can edit the study (no authentication)",
              file=out, flush=True)
    else:
        print(f"from a laptop: ssh -N -L {bound}:127.0.0.1:{bound} USER@THIS_HOST, then open the same URL there", file=out, flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
