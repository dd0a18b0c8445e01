"""The operator's own settings, from environment variables (LUFFY_OPERATOR_*), read once at start-up."""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")

MAX_BACKOFF_SECONDS = 300.0  # the longest wait before retrying a pass that failed transiently


@dataclass(frozen=True)
class OperatorSettings:
    """Tunables of the operator process; each field `x` is read from env `LUFFY_OPERATOR_<X>`. Numbers must be
    positive, booleans are true/false, `run_egress` is a JSON list."""

    resync_seconds: float = 10.0  # how often each run's status is recomputed from its children
    request_timeout_seconds: float = 30.0  # one Kubernetes API call of the reconciler
    watch_server_timeout_seconds: float = 300.0  # ?timeoutSeconds of kopf's watches (long-idle watches go stale)
    watch_client_timeout_seconds: float = 330.0  # client-side cut-off of a watch request
    mlflow_timeout_seconds: float = 10.0  # one MLflow REST call
    workers: int = 16  # threads running the (synchronous) handlers
    # The installation's MLflow credentials, for the operator's own calls, and the one server they are sent to: a run
    # whose spec.mlflow.trackingUri has the same scheme, host and port (chart: operator.mlflow).
    mlflow_tracking_uri: str = ""
    mlflow_username: str = field(default="", repr=False)
    mlflow_password: str = field(default="", repr=False)
    mlflow_token: str = field(default="", repr=False)
    # The installation's credentials may go over plain http (to an in-cluster server behind a proxy, say).
    mlflow_allow_http: bool = False
    # NetworkPolicy egress rules (Kubernetes NetworkPolicyEgressRule objects) added for every run's pods.
    run_egress: tuple[dict[str, Any], ...] = ()

    @property
    def has_mlflow_credentials(self) -> bool:
        return bool(self.mlflow_token or (self.mlflow_username and self.mlflow_password))

    def backoff(self, retry: int) -> float:
        """The delay before retry `retry` (0-based) of a transient failure: resync_seconds, doubling, capped."""
        return min(self.resync_seconds * 2.0 ** min(retry, 32), max(MAX_BACKOFF_SECONDS, self.resync_seconds))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f"LUFFY_OPERATOR_{f.name.upper()}"
            raw = env.get(name)
            if raw is not None:
                values[f.name] = _parse(name, raw, f.default)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse credentials without a server to send them to, or over http when that is not allowed."""
        if not self.has_mlflow_credentials:
            return
        if not self.mlflow_tracking_uri:
            raise ValueError("LUFFY_OPERATOR_MLFLOW_TRACKING_URI must name the server the MLflow credentials are for")
        scheme = urllib.parse.urlsplit(self.mlflow_tracking_uri).scheme
        if scheme != "https" and not (scheme == "http" and self.mlflow_allow_http):
            raise ValueError(
                f"LUFFY_OPERATOR_MLFLOW_TRACKING_URI={self.mlflow_tracking_uri!r}: credentials go over https only "
                "(set LUFFY_OPERATOR_MLFLOW_ALLOW_HTTP=true to allow http)"
            )


def _parse(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.strip().lower() not in TRUE + FALSE:
            raise ValueError(f"{name}={raw!r} is not true or false")
        return raw.strip().lower() in TRUE
    if isinstance(default, str):
        return raw
    if isinstance(default, tuple):
        return _egress_rules(name, raw)
    try:
        value = type(default)(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {type(default).__name__}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _egress_rules(name: str, raw: str) -> tuple[dict[str, Any], ...]:
    """A JSON list of egress rules, each with `to` and/or `ports`, every ipBlock CIDR valid."""
    try:
        rules = json.loads(raw or "[]")
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON: {exc}") from None
    if not isinstance(rules, list) or not all(isinstance(r, dict) and set(r) <= {"to", "ports"} for r in rules):
        raise ValueError(f"{name}: must be a JSON list of NetworkPolicy egress rules (keys `to`, `ports`)")
    for rule in rules:
        for peer in rule.get("to") or []:
            block = peer.get("ipBlock") if isinstance(peer, dict) else None
            for cidr in [block.get("cidr", ""), *block.get("except", [])] if block else []:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
    return tuple(rules)
