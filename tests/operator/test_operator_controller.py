"""The reconciler's edges with a recording stand-in for the Kubernetes client: order of actions, partial failures,
their classification and back-off, and a run's MLflow Secret that the operator does not read. (The same code runs
against the emulator in test_operator_kopf.py.)"""

from __future__ import annotations

import http.client
from typing import Any

from luffy_operator.controller import Controller, classify
from luffy_operator.kube import ApiError, ObjectKey
from luffy_operator.mlflow_rest import MlflowError
from luffy_operator.settings import OperatorSettings
from luffyrun_samples import valid_run
from servers import free_port


class RecordingKube:
    """Answers GETs from a dict of objects, records every write, and fails the writes it is told to."""

    def __init__(self, objects: dict[str, dict[str, Any]] | None = None, failing: set[str] | None = None) -> None:
        self.objects = objects or {}
        self.failing = failing or set()
        self.calls: list[tuple[str, str]] = []
        self.reads: list[str] = []

    def _act(self, verb: str, key: ObjectKey) -> None:
        self.calls.append((verb, f"{key.kind}/{key.name}"))
        if f"{verb} {key.kind}" in self.failing:
            raise ApiError(422, f"{verb} {key}: 422 Invalid: rejected")

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        self.reads.append(f"{key.kind}/{key.name}")
        return self.objects.get(f"{key.kind}/{key.name}")

    def create(self, obj: dict[str, Any]) -> bool:
        self._act("create", ObjectKey.of(obj))
        return True

    def patch(self, key: ObjectKey, patch: dict[str, Any]) -> dict[str, Any]:
        self._act("patch", key)
        return {}

    def delete(self, key: ObjectKey, propagation: str = "Background") -> bool:
        self._act(f"delete-{propagation}", key)
        return True


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    obj = valid_run(**spec)
    obj["metadata"].update(uid="uid-1", generation=1)
    obj["status"] = status or {}
    return obj


def ready_rollout() -> dict[str, Any]:
    return {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}


def test_everything_the_trainer_mounts_is_created_before_its_job() -> None:
    kube = RecordingKube({"StatefulSet/demo-rollout": ready_rollout()})
    outcome = Controller(kube, clock=lambda: "t").reconcile(body(), full=True)
    creates = [name for verb, name in kube.calls if verb == "create"]
    assert creates[-1] == "Job/demo-trainer"
    assert {"ConfigMap/demo-config", "ServiceAccount/demo-trainer", "PersistentVolumeClaim/demo-checkpoints"} <= set(
        creates[:-1]
    )
    assert outcome.failure is None and outcome.status["reason"] == "TrainerStarting"
    assert outcome.accepted["rollout"]["replicas"] == 2  # what later edits are compared against


def test_a_failed_action_is_reported_and_the_others_still_run() -> None:
    kube = RecordingKube({"StatefulSet/demo-rollout": ready_rollout()}, failing={"create ConfigMap"})
    outcome = Controller(kube, clock=lambda: "t").reconcile(body(), full=True)
    assert outcome.failure.permanent and "ConfigMap default/demo-config" in outcome.failure.message
    assert "422" in outcome.failure.message and outcome.retry_in is None
    assert ("create", "Job/demo-trainer") in kube.calls
    cond = next(c for c in outcome.status["conditions"] if c["type"] == "Reconciled")
    assert (cond["status"], cond["reason"]) == ("False", "PermanentError")
    assert [(e.type, e.reason) for e in outcome.events][-1] == ("Warning", "PermanentError")


def test_suspending_deletes_the_job_in_the_foreground_and_scales_the_rollout() -> None:
    job = {"metadata": {"annotations": {"luffy.dev/attempt": "0", "luffy.dev/rollout-replicas": "2"}}, "status": {}}
    kube = RecordingKube({"StatefulSet/demo-rollout": ready_rollout(), "Job/demo-trainer": job})
    Controller(kube, clock=lambda: "t").reconcile(body({"phase": "Running"}, suspend=True), full=False)
    assert kube.calls == [("patch", "StatefulSet/demo-rollout"), ("delete-Foreground", "Job/demo-trainer")]


def test_a_runs_credentials_secret_is_not_read_by_the_operator() -> None:
    """The Secret a run names is the trainer's (secretKeyRef): the operator's MLflow call goes without it, and an
    unreachable server is an MLflow condition, not a reason to look at the Secret."""
    secret = {"metadata": {"name": "creds"}, "data": {"token": "czNjcmV0"}}
    kube = RecordingKube({"StatefulSet/demo-rollout": ready_rollout(), "Secret/creds": secret})
    mlflow = {"trackingUri": f"http://127.0.0.1:{free_port()}", "credentialsSecret": {"name": "creds"}}
    settings = OperatorSettings(mlflow_timeout_seconds=2.0)
    outcome = Controller(kube, settings, clock=lambda: "t").reconcile(body(mlflow=mlflow), full=False)
    cond = next(c for c in outcome.status["conditions"] if c["type"] == "MlflowReady")
    assert (cond["status"], cond["reason"]) == ("False", "MlflowUnreachable")
    assert not [r for r in kube.reads if r.startswith("Secret/")]
    assert ("create", "Job/demo-trainer") not in kube.calls


def test_errors_are_classified_permanent_or_transient() -> None:
    transient = [ApiError(0, "refused"), ApiError(409, "conflict"), ApiError(429, "slow down"), ApiError(503, "down")]
    transient += [MlflowError("unreachable", unreachable=True), TimeoutError("timed out"), ConnectionResetError()]
    permanent = [ApiError(400, "bad"), ApiError(403, "forbidden"), ApiError(422, "invalid"), ValueError("port")]
    permanent += [TypeError("None"), KeyError("x"), http.client.InvalidURL("nonnumeric port: 'abc'")]
    assert [classify(e).permanent for e in transient] == [False] * len(transient)
    assert [classify(e).permanent for e in permanent] == [True] * len(permanent)
    assert classify(ValueError("bad port"), "creating X").message == "creating X: ValueError: bad port"


def test_the_back_off_doubles_from_the_resync_interval_and_is_capped() -> None:
    settings = OperatorSettings(resync_seconds=20.0)
    assert [settings.backoff(r) for r in range(6)] == [20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert settings.backoff(10_000) == 300.0


class BrokenKube(RecordingKube):
    """Every read raises `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        raise self.error


def test_an_exception_while_planning_keeps_the_conditions_and_stalls_the_generation() -> None:
    old = {"conditions": [{"type": "SpecAccepted", "status": "True", "reason": "Accepted", "lastTransitionTime": "t0"}]}
    outcome = Controller(BrokenKube(ValueError("no such thing")), clock=lambda: "t").reconcile(body(old), full=False)
    assert [c["type"] for c in outcome.status["conditions"]] == ["SpecAccepted", "Reconciled"]
    assert outcome.failure.permanent and outcome.record["stalledGeneration"] == 1 and outcome.accepted is None
    controller = Controller(BrokenKube(ApiError(503, "down")), clock=lambda: "t")
    retried = controller.reconcile(body(), full=False, retry=2)
    assert not retried.failure.permanent and retried.retry_in == 4 * controller.settings.resync_seconds
    assert "stalledGeneration" not in retried.record and "(retry 3 in " in retried.failure.message
