"""kopf handlers for LuffyRun: thin wrappers around `Controller.reconcile`.

Run with `luffy-operator run` or `kopf run -m luffy_operator.handlers`. Create, resume (operator start) and spec updates
share one idempotent reconcile; a resync loop repeats it every LUFFY_OPERATOR_RESYNC_SECONDS to follow the children
(trainer Job, rollout StatefulSet) until the run is finished. One replica only: kopf has no leader election.

No finalizer: kopf puts one on every object a timer or daemon watches, and a LuffyRun deleted while the operator is
down would then hang in Terminating with its GPU pods running. Its children are owned (ownerReferences), so the
garbage collector needs nobody; the resync loop is a thread fed by a watch-event handler (which needs no finalizer)
and writes what a handler's patch would. Runs created by an older operator lose kopf's finalizer on the next pass.

Every pass ends with a Reconciled condition. A failed one also posts a Warning Event and tells kopf how to go on:
a permanent failure raises kopf.PermanentError (no retry; the record's stalled generation stops the resync loop until
the spec changes), a transient one kopf.TemporaryError with a doubling delay (OperatorSettings.backoff).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import kopf
from luffy_trainer.contract import GROUP, PLURAL, VERSION

from luffy_operator.controller import Controller, Outcome, annotation_values
from luffy_operator.kube import KubeClient, load_api_client
from luffy_operator.reconcile import RECORD_ANNOTATION, Event, read_annotation
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
    memo.runs, memo.locks, memo.stop = {}, {}, threading.Event()  # shared with every run's memo (shallow copies)
    memo.resync = threading.Thread(target=resync_loop, args=(memo, logger), name="luffy-resync", daemon=True)
    memo.resync.start()
    logger.info("luffy operator configured: %s", SETTINGS)


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    memo.stop.set()
    memo.resync.join(timeout=SETTINGS.request_timeout_seconds + 5)


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


def unfinished(annotations: Any, meta: Any) -> bool:
    """The resync loop passes over a run until the operator's record says it is finalized, or that a permanent error
    stalled this generation (a spec edit reopens it). The record is in metadata: a forged `status.finalized` cannot
    stop it."""
    record = read_annotation(annotations, RECORD_ANNOTATION)
    return not record.get("finalized") and record.get("stalledGeneration") != meta.get("generation")


@kopf.on.event(*RESOURCE)
def track(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Keep the latest body of every run for the resync loop; forget a deleted one."""
    body = event["object"]
    uid = body["metadata"]["uid"]
    if event["type"] == "DELETED":
        memo.runs.pop(uid, None)
        memo.locks.pop(uid, None)
    else:
        memo.runs[uid] = json.loads(json.dumps(body))


def resync_loop(memo: kopf.Memo, logger: logging.Logger) -> None:
    """Every resync interval, a pass over each unfinished run (what a kopf timer would do, without its finalizer).
    A transient failure waits out its back-off; one that escapes the controller posts a Warning Event and backs off."""
    backoff: dict[str, tuple[float, int]] = {}  # uid -> (monotonic time of the next pass, retries so far)
    while not memo.stop.wait(SETTINGS.resync_seconds):
        for uid, body in list(memo.runs.items()):
            not_before, retry = backoff.get(uid, (0.0, 0))
            md = body["metadata"]
            going = md.get("deletionTimestamp") or not unfinished(md.get("annotations") or {}, md)
            if going or time.monotonic() < not_before:
                continue
            try:
                with run_lock(memo, uid):
                    outcome = memo.controller.reconcile(body, full=False, retry=retry)
                    memo.controller.write(body, outcome)
            except Exception as exc:
                logger.exception("resync pass over %s/%s failed", md["namespace"], md["name"])
                outcome = Outcome(events=[Event("Warning", "TransientError", f"{type(exc).__name__}: {exc}")])
                outcome.retry_in = SETTINGS.backoff(retry)
                try:
                    memo.controller.write(body, outcome)
                except Exception:
                    logger.exception("could not post the Warning Event")
            failure = outcome.failure
            if outcome.retry_in is not None:
                backoff[uid] = (time.monotonic() + outcome.retry_in, retry + 1)
            elif failure is None or failure.permanent:
                backoff.pop(uid, None)


def run_pass(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, full: bool, retry: int
) -> None:
    """One pass under the run's lock. The controller classifies its own failures; anything escaping it still ends in
    a Warning Event and no retry rather than kopf's endless one."""
    try:
        with run_lock(memo, body["metadata"]["uid"]):
            outcome = memo.controller.reconcile(body, full=full, retry=retry)
    except Exception as exc:
        logger.exception("reconcile pass failed")
        kopf.event(body, type="Warning", reason="PermanentError", message=f"{type(exc).__name__}: {exc}"[:1000])
        raise kopf.PermanentError(str(exc)) from exc
    apply_outcome(outcome, body, patch, logger)


def run_lock(memo: kopf.Memo, uid: str) -> threading.Lock:
    """One pass at a time per LuffyRun: the resync loop runs concurrently with kopf's handlers, and two passes that
    both find no MLflow run would each create one. (`memo.locks` is shared; setdefault is atomic.)"""
    return memo.locks.setdefault(uid, threading.Lock())


def apply_outcome(outcome: Outcome, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger) -> None:
    """Write status and annotations through kopf's patch (applied even when the handler raises), post Events, and
    hand a failure to kopf: permanent, or temporary with its back-off delay."""
    if outcome.status is not None:
        patch.status.update(outcome.status)
    for key, value in annotation_values(outcome).items():
        patch.metadata.annotations[key] = value
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        logger.info("%s %s: %s", event.type, event.reason, event.message)
    failure = outcome.failure
    if failure is not None and failure.permanent:
        raise kopf.PermanentError(failure.message)
    if failure is not None:
        raise kopf.TemporaryError(failure.message, delay=outcome.retry_in or SETTINGS.resync_seconds)
