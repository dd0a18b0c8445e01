"""The operator's own settings, from environment variables (LUFFY_OPERATOR_*), read once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

MAX_BACKOFF_SECONDS = 300.0  # the longest wait before retrying a pass that failed transiently


@dataclass(frozen=True)
class OperatorSettings:
    """Tunables of the operator process; each field `x` is read from env `LUFFY_OPERATOR_<X>`."""

    resync_seconds: float = 10.0  # how often each run's status is recomputed from its children
    request_timeout_seconds: float = 30.0  # one Kubernetes API call of the reconciler
    watch_server_timeout_seconds: float = 300.0  # ?timeoutSeconds of kopf's watches (long-idle watches go stale)
    watch_client_timeout_seconds: float = 330.0  # client-side cut-off of a watch request
    mlflow_timeout_seconds: float = 10.0  # one MLflow REST call
    workers: int = 16  # threads running the (synchronous) handlers

    def backoff(self, retry: int) -> float:
        """The delay before retry `retry` (0-based) of a transient failure: resync_seconds, doubling, capped."""
        return min(self.resync_seconds * 2.0 ** min(retry, 32), max(MAX_BACKOFF_SECONDS, self.resync_seconds))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"LUFFY_OPERATOR_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    kind = type(f.default).__name__
                    raise ValueError(f"LUFFY_OPERATOR_{f.name.upper()}={raw!r} is not a {kind}") from None
                if values[f.name] <= 0:
                    raise ValueError(f"LUFFY_OPERATOR_{f.name.upper()} must be positive, got {raw!r}")
        return cls(**values)
