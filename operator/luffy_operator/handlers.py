"""kopf handlers for LuffyRun: thin wrappers around `Controller.reconcile`.

Run with `luffy-operator run` or `kopf run -m luffy_operator.handlers`. Create, resume (operator start) and spec updates
share one idempotent reconcile; a timer repeats it every LUFFY_OPERATOR_RESYNC_SECONDS to follow the children
(trainer Job, rollout StatefulSet) until the run is finished. One replica only: kopf has no leader election.

Every pass ends with a Reconciled condition. A failed one also posts a Warning Event and tells kopf how to go on:
a permanent failure raises kopf.PermanentError (no retry; the record's stalled generation stops the timer until the
spec changes), a transient one kopf.TemporaryError with a doubling delay (OperatorSettings.backoff).
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
from luffy_operator.reconcile import ACCEPTED_SPEC_ANNOTATION, RECORD_ANNOTATION, read_annotation
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
def reconcile(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, retry: int, **_: Any
) -> None:
    run_pass(body, patch, memo, logger, full=True, retry=retry)


def unfinished(annotations: kopf.Annotations, meta: kopf.Meta, **_: Any) -> bool:
    """The timer runs until the operator's record says the run is finalized, or that a permanent error stalled this
    generation; kopf stops it when this turns false (and restarts it when a spec edit reopens the run). The record
    is in metadata: a forged `status.finalized` cannot stop it."""
    record = read_annotation(annotations, RECORD_ANNOTATION)
    return not record.get("finalized") and record.get("stalledGeneration") != meta.get("generation")


@kopf.timer(*RESOURCE, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds, when=unfinished)
def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, retry: int, **_: Any) -> None:
    run_pass(body, patch, memo, logger, full=False, retry=retry)


def run_pass(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, full: bool, retry: int
) -> None:
    """One pass under the run's lock. The controller classifies its own failures; anything escaping it still ends in
    a Warning Event and no retry rather than kopf's endless one."""
    try:
        with run_lock(memo):
            outcome = memo.controller.reconcile(body, full=full, retry=retry)
    except Exception as exc:
        logger.exception("reconcile pass failed")
        kopf.event(body, type="Warning", reason="PermanentError", message=f"{type(exc).__name__}: {exc}"[:1000])
        raise kopf.PermanentError(str(exc)) from exc
    apply_outcome(outcome, body, patch, logger)


def run_lock(memo: kopf.Memo) -> threading.Lock:
    """One pass at a time per LuffyRun: kopf runs a run's timer concurrently with its handlers, and two passes that
    both find no MLflow run would each create one. (`memo` is per object; setdefault is atomic.)"""
    return memo.setdefault("reconcile_lock", threading.Lock())


def apply_outcome(outcome: Outcome, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger) -> None:
    """Write status and annotations through kopf's patch (applied even when the handler raises), post Events, and
    hand a failure to kopf: permanent, or temporary with its back-off delay."""
    if outcome.status is not None:
        patch.status.update(outcome.status)
    for key, value in ((ACCEPTED_SPEC_ANNOTATION, outcome.accepted), (RECORD_ANNOTATION, outcome.record)):
        if value is not None:
            patch.metadata.annotations[key] = json.dumps(value, sort_keys=True, separators=(",", ":"))
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        logger.info("%s %s: %s", event.type, event.reason, event.message)
    failure = outcome.failure
    if failure is not None and failure.permanent:
        raise kopf.PermanentError(failure.message)
    if failure is not None:
        raise kopf.TemporaryError(failure.message, delay=outcome.retry_in or SETTINGS.resync_seconds)
