"""Trainer rank 0 reports progress into its run's progress ConfigMap; the operator copies it into `status.progress`.

The operator passes the run's name and namespace (`contract.ENV_RUN_NAME`, `contract.ENV_RUN_NAMESPACE`), the attempt
(`contract.ENV_ATTEMPT`) and a service account that may patch only that ConfigMap: the trainer cannot write its
LuffyRun, so it cannot touch the restart budget or the run's lifecycle. Outside a cluster (no run name) `from_env()`
returns None. Reporting never raises into the training loop: an API error is logged and a later report tries again.
Reports are rate-limited; the last step is always sent.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from luffy_trainer.contract import (
    ENV_ATTEMPT,
    ENV_RUN_NAME,
    ENV_RUN_NAMESPACE,
    PROGRESS_KEY,
    ProgressReport,
    progress_config_map,
)

log = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL_S = 10.0


class ProgressReporter:
    """Merge-patches the progress report into the run's progress ConfigMap."""

    def __init__(
        self,
        name: str,
        namespace: str,
        api: Any,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 5.0,
        attempt: int = 0,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.api = api  # kubernetes.client.CoreV1Api
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.timeout_s = timeout_s
        self.attempt = attempt
        self._last_sent: float | None = None

    @classmethod
    def from_env(cls, min_interval_s: float = DEFAULT_MIN_INTERVAL_S) -> ProgressReporter | None:
        """A reporter for the LuffyRun the environment names, or None when it names none.

        Uses the pod's service account, or the kubeconfig when run outside a pod."""
        identity = run_identity(os.environ)
        if identity is None:
            return None
        name, namespace = identity
        try:
            import kubernetes

            config = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=config)
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=config)
            api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))
        except Exception as exc:  # no kubernetes package, no credentials: training goes on without reports
            log.warning("LuffyRun progress reports disabled: cannot configure a Kubernetes client (%s)", exc)
            return None
        attempt = os.environ.get(ENV_ATTEMPT, "0")
        return cls(
            name, namespace, api, min_interval_s=min_interval_s, attempt=int(attempt) if attempt.isdigit() else 0
        )

    def report(self, step: int, total_steps: int, reward: float | None) -> None:
        """Record progress; skipped if the last report was under `min_interval_s` ago, unless this is the last step."""
        now = self.clock()
        final = step >= total_steps
        if not final and self._last_sent is not None and now - self._last_sent < self.min_interval_s:
            return
        progress = ProgressReport(
            step=step,
            total_steps=total_steps,
            reward=None if reward is None or reward != reward else float(reward),  # NaN is not valid JSON
            updated_time=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            attempt=self.attempt,
        )
        self._last_sent = now  # attempts are rate-limited too: an unreachable API must not slow every step
        body = {"data": {PROGRESS_KEY: progress.model_dump_json(by_alias=True)}}
        try:
            self.api.patch_namespaced_config_map(
                progress_config_map(self.name),
                self.namespace,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self.timeout_s,
            )
        except Exception as exc:  # the training loop must not die for a progress report
            log.warning("could not report progress of LuffyRun %s/%s: %s", self.namespace, self.name, exc)


def run_identity(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(name, namespace) of the LuffyRun this pod belongs to, as the operator set them; None outside a LuffyRun."""
    name = environ.get(ENV_RUN_NAME)
    if not name:
        return None
    return name, environ.get(ENV_RUN_NAMESPACE) or _pod_namespace()


def _pod_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"
