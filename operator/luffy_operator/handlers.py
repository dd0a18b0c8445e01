"""kopf handlers for LuffyRun: thin wrappers around `Controller.reconcile`.

Run with `luffy-operator run` or `kopf run -m luffy_operator.handlers`. Create, resume (operator start) and spec updates
share one idempotent reconcile; a timer repeats it every LUFFY_OPERATOR_RESYNC_SECONDS to follow the children
(trainer Job, rollout StatefulSet) until the run is finished. One replica only: kopf has no leader election.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import kopf
from luffy_trainer.contract import GROUP, PLURAL, VERSION

from luffy_operator.controller import Controller, Outcome
from luffy_operator.kube import KubeClient, load_api_client
from luffy_operator.reconcile import ACCEPTED_SPEC_ANNOTATION
from luffy_operator.settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
RESOURCE = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Annotation names under luffy.dev, bounded watches and API calls, and the shared controller."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.watching.server_timeout = SETTINGS.watch_server_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_client_timeout_seconds
    settings.watching.connect_timeout = SETTINGS.request_timeout_seconds
    settings.networking.request_timeout = SETTINGS.request_timeout_seconds
    settings.execution.max_workers = SETTINGS.workers
    memo.controller = Controller(KubeClient(load_api_client(), SETTINGS.request_timeout_seconds), SETTINGS)
    logger.info("luffy operator configured: %s", SETTINGS)


@kopf.on.probe(id="controller")
def controller_ready(memo: kopf.Memo, **_: Any) -> bool:
    """Liveness (`--liveness` endpoint): answers only while kopf's event loop runs and the controller is set up."""
    return getattr(memo, "controller", None) is not None


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    with run_lock(memo):
        outcome = memo.controller.reconcile(body, full=True)
    apply_outcome(outcome, body, patch, logger)


def unfinished(status: kopf.Status, **_: Any) -> bool:
    """The timer runs only until a run is finalized; kopf stops it when this turns false (and restarts it if a fixed
    spec reopens the run)."""
    return not status.get("finalized")


@kopf.timer(*RESOURCE, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds, when=unfinished)
def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    with run_lock(memo):
        outcome = memo.controller.reconcile(body, full=False)
    apply_outcome(outcome, body, patch, logger)


def run_lock(memo: kopf.Memo) -> threading.Lock:
    """One pass at a time per LuffyRun: kopf runs a run's timer concurrently with its handlers, and two passes that
    both find no MLflow run would each create one. (`memo` is per object; setdefault is atomic.)"""
    return memo.setdefault("reconcile_lock", threading.Lock())


def apply_outcome(outcome: Outcome, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger) -> None:
    """Write status and annotation through kopf's patch, post Events; action errors are retried by kopf."""
    if outcome.status is not None:
        patch.status.update(outcome.status)
    if outcome.accepted is not None:
        patch.metadata.annotations[ACCEPTED_SPEC_ANNOTATION] = json.dumps(
            outcome.accepted, sort_keys=True, separators=(",", ":")
        )
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        logger.info("%s %s: %s", event.type, event.reason, event.message)
    if outcome.errors:
        raise kopf.TemporaryError("; ".join(outcome.errors), delay=SETTINGS.resync_seconds)
