"""The rollout servers' control token: one random secret per run, required on every route but `/health`.

vLLM's own `--api-key` check (vllm/entrypoints/serve/middleware/authenticate.py, `AuthenticationMiddleware`) guards
only paths under `/v1`, `/v2`, `/inference` and `/cohere`; the dev routes luffy needs (`/collective_rpc`,
`/reset_prefix_cache`, ...) and the rest (`/tokenize`, `/pause`, `/update_weights`, `/metrics`, ...) stay open. So
`luffy serve-rollout` adds `ControlTokenMiddleware` through vLLM's `--middleware` option: a Bearer check on every
HTTP and WebSocket request except the probes' path. The token comes from a file (a Secret volume in a pod), named by
the environment variable `ENV_TOKEN_FILE`, because vLLM builds the middleware with no arguments.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

from luffy_trainer import contract

ENV_TOKEN_FILE = "LUFFY_CONTROL_TOKEN_FILE"
MIDDLEWARE = f"{__name__}.ControlTokenMiddleware"


class ControlTokenError(ValueError):
    """A token file that cannot be used."""


def read_token(path: str | Path) -> str:
    """The token in `path` without surrounding whitespace: one non-empty word of printable ASCII (a header value)."""
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlTokenError(f"control token file {path}: {exc}") from None
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise ControlTokenError(f"control token file {path}: empty, or not one word of printable ASCII")
    return token


def authorization(token: str) -> dict[str, str]:
    """The header a client sends."""
    return {"Authorization": f"Bearer {token}"}


class ControlTokenMiddleware:
    """Pure ASGI middleware: a request without `Authorization: Bearer <token>` gets 401 (a WebSocket is closed), except
    on `contract.CONTROL_OPEN_PATHS`. The comparison is constant-time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        path = os.environ.get(ENV_TOKEN_FILE)
        if not path:
            raise ControlTokenError(f"{ENV_TOKEN_FILE} is not set: no control token to check against")
        self.expected = f"Bearer {read_token(path)}".encode()

    def allowed(self, scope: dict[str, Any]) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in contract.CONTROL_OPEN_PATHS:
            return True
        given = next((v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = json.dumps({"error": "Unauthorized: this rollout server needs its run's control token"}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
