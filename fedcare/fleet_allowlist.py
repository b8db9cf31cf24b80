"""The public SuperLink listener's gate: a pure-ASGI allowlist that lets only the Fleet API through.

Flower 1.41 serves Fleet, Control and Runtime APIs from one FastAPI app, and its Control API has
no authentication in the open-source build: whoever reaches it can list, start and stop runs and
register or remove node keys. Hospitals must reach the Fleet API, so the listener they dial wraps
the app in `FleetOnly`, which passes a request on only when its path is *exactly* one of the
app's own Fleet routes (`/v1/fleet/<name>`) or `/health`; everything else, `/docs` and
`/openapi.json` included, gets the same 404 FastAPI gives an unknown path.

Exact matching (a frozen set of literal paths) rather than a prefix test is what closes the
encoding tricks: a request whose decoded path is allowed must also carry that same path, byte for
byte, as its raw path (so `%2e%2e`, `%2f` or any percent-encoding is refused), a non-empty ASGI
`root_path` is refused (it would shift what the router matches), and websockets are closed.
Nothing here imports Flower or FastAPI: the caller hands in the app and the paths it allows.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
# A path the gate may allow: fixed lower-case segments, no parameters, no dots, no encoding.
_LITERAL_PATH = re.compile(r"^/[a-z0-9]+(?:[/-][a-z0-9]+)*$")
_NOT_FOUND = b'{"detail":"Not Found"}'


class FleetOnly:
    """ASGI middleware: forward an HTTP request to ``app`` only when its path is in ``allowed_paths``.

    ``allowed_paths`` must be non-empty literal paths, each `/health` or under `/v1/fleet/`: the gate
    refuses to be built around anything else (a Control or Runtime path slipping into the set
    would silently publish it).
    """

    def __init__(self, app: ASGIApp, allowed_paths: Iterable[str]) -> None:
        paths = frozenset(allowed_paths)
        bad = sorted(
            p for p in paths if not _LITERAL_PATH.match(p) or not (p == HEALTH_PATH or p.startswith(FLEET_PREFIX))
        )
        if not paths or bad:
            raise ValueError(
                f"the public listener may allow only literal Fleet paths and {HEALTH_PATH}; got {bad or 'nothing'}"
            )
        self.app = app
        self.allowed_paths = paths

    def admits(self, scope: Scope) -> bool:
        """Whether this HTTP scope may reach the app: an allowed path, not encoded, no root_path."""
        path, raw_path = scope.get("path"), scope.get("raw_path")
        if scope.get("root_path", "") != "" or not isinstance(path, str) or path not in self.allowed_paths:
            return False
        return raw_path is None or raw_path == path.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.admits(scope):
                await self.app(scope, receive, send)
            else:
                await _not_found(send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation; never accepted
        else:  # the loopback listener owns the lifespan; this one serves nothing else
            raise RuntimeError(f"the public SuperLink listener does not serve '{kind}' scopes")


async def _not_found(send: Send) -> None:
    """The 404 FastAPI itself sends for an unknown path (so the gate looks like nothing is there)."""
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_NOT_FOUND)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": _NOT_FOUND})
