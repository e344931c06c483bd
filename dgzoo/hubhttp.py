"""Every call to the Hub ends: a timeout on each request, and a bounded number of tries.

huggingface_hub's shared HTTP client waits forever by default (and most of its calls pass ``timeout=None``), so a
Hub or proxy that accepts a connection and never answers would hang ``dgzoo push``, ``dgzoo zoo list`` or a
dataset download without a word. dgzoo installs a client whose transport gives every request a limit of
``DGZOO_HUB_TIMEOUT`` seconds (default 30) to connect and for each read or write. huggingface_hub already retries
its calls a bounded number of times (``http_backoff``: 5 retries, waits up to 8 s); once they are spent the call
raises, and the command turns the error into its one line. A client factory the user installed is left alone.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_TIMEOUT_S = 30.0


def hub_timeout() -> float:
    """Seconds a Hub request may wait to connect, and for each read or write (``DGZOO_HUB_TIMEOUT``)."""
    try:
        value = float(os.environ.get("DGZOO_HUB_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def install_hub_timeouts() -> None:
    """Make huggingface_hub's shared client time out (idempotent; a user's own client factory is kept)."""
    import httpx2
    from huggingface_hub.utils import _http

    if _http._GLOBAL_CLIENT_FACTORY is not _http.default_client_factory:
        return  # ours already, or the user's

    class TimeoutTransport(httpx2.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            # A request-level timeout=None overrides the client's: fill in every unset limit here.
            limits = dict(request.extensions.get("timeout") or {})
            request.extensions["timeout"] = {
                key: limits.get(key) or hub_timeout() for key in ("connect", "read", "write", "pool")
            }
            return super().handle_request(request)

    def factory() -> Any:
        return httpx2.Client(
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
            timeout=httpx2.Timeout(hub_timeout()),
            transport=TimeoutTransport(),
        )

    _http.set_client_factory(factory)
