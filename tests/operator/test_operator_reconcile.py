"""The reconciler's decisions (a pure function of the run and what was observed), scenario by scenario.

`body(status=...)` stands for a run the operator has seen before: the status and the record annotation it wrote with
it (the status fields the decisions read back). Forged statuses give the record explicitly."""

from __future__ import annotations

import json
from typing import Any

import yaml
from luffy_operator.api import dump_spec, parse_spec
from luffy_operator.reconcile import (
    ACCEPTED_SPEC_ANNOTATION,
    MLFLOW_DELEGATED,
    RECORD_ANNOTATION,
    RECORD_FIELDS,
    JobView,
    MlflowView,
    Observed,
    Plan,
    RolloutView,
    RunView,
    needs_model_version,
    plan_run,
    resolve_spec,
)
from luffy_trainer.config import parse_config
from luffyrun_samples import valid_run

NOW = "2026-11-25T12:00:00Z"


def body(
    status: dict[str, Any] | None = None,
    accepted: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    **spec: Any,
) -> dict:
    obj = valid_run(**spec)
    obj["metadata"].update(uid="uid-1", generation=3)
    status = status or {}
    if record is None:
        record = {k: v for k, v in status.items() if k in RECORD_FIELDS}
    annotations = {RECORD_ANNOTATION: json.dumps(record)}
    if accepted is not None:
        annotations[ACCEPTED_SPEC_ANNOTATION] = json.dumps(accepted)
    obj["metadata"]["annotations"] = annotations
    obj["status"] = status
    return obj


def accepted_of(**spec: Any) -> dict[str, Any]:
    return dump_spec(parse_spec(valid_run(**spec)["spec"]))


def job(attempt: int = 0, replicas: int = 2, *, ready: int = 0, condition: str | None = None, **extra: Any) -> JobView:
    status: dict[str, Any] = {"ready": ready, "active": ready}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded"}]
    obj = {
        "metadata": {"annotations": {"luffy.dev/attempt": str(attempt), "luffy.dev/rollout-replicas": str(replicas)}},
        "status": status,
    }
    if extra.pop("terminating", False):
        obj["metadata"]["deletionTimestamp"] = NOW
    return JobView.of(obj)


def plan(obj: dict, job_view: JobView | None = None, rollout: RolloutView | None = None, **kw: Any) -> Plan:
    run = RunView.from_body(obj)
    observed = Observed(job=job_view, rollout=rollout, mlflow=kw.pop("mlflow", MlflowView()))
    return plan_run(run, resolve_spec(run), observed, kw.pop("now", NOW), full=kw.pop("full", False))


def kinds(manifests: list[dict]) -> list[str]:
    return [m["kind"] for m in manifests]


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


READY = RolloutView(replicas=2, ready=2)


def test_new_run_creates_everything_but_the_trainer_until_the_rollout_is_ready() -> None:
    p = plan(body())
    assert "StatefulSet" in kinds(p.ensure) and "ConfigMap" in kinds(p.ensure) and "Job" not in kinds(p.ensure)
    sts = next(m for m in p.ensure if m["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert p.create_job is None
    assert (p.status["phase"], p.status["reason"]) == ("Pending", "WaitingForRollout")
    assert p.accepted == accepted_of()
    assert condition(p.status, "SpecAccepted")["status"] == "True"
    assert [e.reason for e in p.events][:1] == ["WaitingForRollout"]


def test_ready_rollout_starts_the_trainer_with_attempt_zero() -> None:
    p = plan(body(status={"phase": "Pending", "reason": "WaitingForRollout"}), rollout=READY)
    assert p.create_job is not None
    assert p.create_job["metadata"]["annotations"]["luffy.dev/attempt"] == "0"
    assert "ConfigMap" in kinds(p.ensure)  # what the trainer pods mount exists first
    assert (p.status["phase"], p.status["reason"]) == ("Pending", "TrainerStarting")


def test_all_ranks_ready_is_running_with_a_start_time() -> None:
    p = plan(body(status={"phase": "Pending"}), job(ready=1), READY)
    assert p.status["phase"] == "Running" and p.status["startTime"] == NOW
    assert condition(p.status, "TrainerRunning")["status"] == "True"
    assert p.create_job is None and not p.delete_job
    later = plan(body(status=p.status), job(ready=1), READY, now="2026-11-25T13:00:00Z")
    assert "startTime" not in later.status  # kept as first recorded
    assert condition(later.status, "TrainerRunning")["lastTransitionTime"] == NOW
    assert later.events == []


def test_a_failure_is_counted_once_then_the_job_is_replaced() -> None:
    running = {"phase": "Running", "restarts": 0}
    counted = plan(body(status=running), job(0, condition="Failed"), READY)
    assert (counted.status["phase"], counted.status["reason"], counted.status["restarts"]) == (
        "Restarting",
        "TrainerFailed",
        1,
    )
    assert not counted.delete_job and counted.create_job is None
    assert (counted.events[0].type, counted.events[0].reason) == ("Warning", "TrainerFailed")
    again = plan(body(status=counted.status), job(0, condition="Failed"), READY)
    assert again.status["restarts"] == 1 and again.delete_job and again.create_job is None
    replaced = plan(body(status=again.status), None, READY)
    assert replaced.create_job["metadata"]["annotations"]["luffy.dev/attempt"] == "1"


def test_failures_beyond_max_restarts_fail_the_run_and_its_mlflow_run() -> None:
    status = {"phase": "Running", "restarts": 1, "mlflow": {"runId": "r1"}}
    obj = body(status=status, mlflow={"trackingUri": "http://mlflow:5000"}, failurePolicy={"maxRestarts": 1})
    p = plan(obj, job(1, condition="Failed"), READY)
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "MaxRestartsExceeded")
    assert p.status["restarts"] == 1 and p.status["completionTime"] == NOW
    assert p.fail_mlflow_run == "r1"
    assert p.scale_rollout == 0 and not p.delete_job and p.create_job is None
    assert condition(p.status, "Failed")["status"] == "True"
    assert p.status["finalized"] is False  # until the rollout is observed at zero
    done = plan(body(status=p.status, mlflow={"trackingUri": "http://mlflow:5000"}), job(1, condition="Failed"))
    assert done.status["finalized"] is True and done.fail_mlflow_run is None
    assert done.status["phase"] == "Failed" and done.events == []


def test_success_scales_the_rollout_down_and_records_the_model_version() -> None:
    mlflow = {"trackingUri": "http://mlflow:5000", "registeredModelName": "policy"}
    running = {"phase": "Running", "mlflow": {"runId": "r1"}}
    p = plan(body(status=running, mlflow=mlflow), job(0, condition="Complete"), READY)
    assert (p.status["phase"], p.scale_rollout) == ("Succeeded", 0)
    assert p.status["rollout"]["desired"] == 0 and p.status["finalized"] is False
    seen = MlflowView(model_version="3", model_lookup_done=True)
    done = plan(body(status=p.status, mlflow=mlflow), job(0, condition="Complete"), RolloutView(0, 0), mlflow=seen)
    assert done.status["mlflow"] == {"runId": "r1", "modelName": "policy", "modelVersion": "3"}
    assert done.status["finalized"] is True and done.scale_rollout is None


def test_cleanup_delete_removes_workloads_but_keeps_config_and_checkpoints() -> None:
    p = plan(body(status={"phase": "Running"}, cleanup={"onSuccess": "Delete"}), job(condition="Complete"), READY)
    deleted = {(k.kind, k.name) for k in p.delete}
    assert {("Job", "demo-trainer"), ("StatefulSet", "demo-rollout"), ("Service", "demo-rollout")} <= deleted
    assert {("NetworkPolicy", "demo-trainer"), ("Role", "demo-trainer"), ("ServiceAccount", "demo-trainer")} <= deleted
    assert not {k.kind for k in p.delete} & {"ConfigMap", "PersistentVolumeClaim"}
    assert p.scale_rollout is None and not p.ensure
    gone = plan(body(status=p.status, cleanup={"onSuccess": "Delete"}), None, None)
    assert gone.status["finalized"] is True and gone.delete == [] and gone.ensure == []


def test_suspend_stops_the_trainer_and_resume_continues_from_the_checkpoint() -> None:
    running = {"phase": "Running", "restarts": 1}
    p = plan(body(status=running, suspend=True), job(1, ready=1), READY)
    assert p.delete_job and p.scale_rollout == 0 and p.status["phase"] == "Suspended"
    assert condition(p.status, "Suspended")["status"] == "True"
    still = plan(body(status=p.status, suspend=True), None, RolloutView(0, 0))
    assert still.create_job is None and still.scale_rollout is None and still.status["phase"] == "Suspended"
    resumed = plan(body(status=still.status), None, RolloutView(0, 0))
    assert resumed.scale_rollout == 2 and resumed.create_job is None  # waits for the rollout again
    restarted = plan(body(status=resumed.status), None, READY)
    assert restarted.create_job["metadata"]["annotations"]["luffy.dev/attempt"] == "1"  # not counted as a failure
    assert restarted.status["restarts"] == 1


def test_rescaling_the_rollout_restarts_the_trainer_with_the_new_endpoints() -> None:
    status = {"phase": "Running", "restarts": 0}
    p = plan(body(status=status, rollout={"replicas": 3, "gpusPerReplica": 0}), job(0, 2, ready=1), READY)
    assert p.delete_job and p.scale_rollout == 3
    assert (p.status["phase"], p.status["reason"], p.status["restarts"]) == ("Restarting", "RolloutRescaled", 0)
    grown = RolloutView(3, 3)
    new = plan(body(status=p.status, rollout={"replicas": 3, "gpusPerReplica": 0}), None, grown)
    (cm,) = [c for c in new.ensure if c["metadata"]["name"] == "demo-config"]
    assert len(parse_config(yaml.safe_load(cm["data"]["config.yaml"])).rollout.server_urls) == 3


def test_an_immutable_edit_is_refused_with_a_condition_and_ignored() -> None:
    accepted = accepted_of()
    edited = body(
        status={"phase": "Pending"},
        accepted=accepted,
        model={"path": "/other/model", "dtype": "float32"},
        rollout={"replicas": 3, "gpusPerReplica": 0},
    )
    p = plan(edited, None, RolloutView(3, 3), full=True)
    cond = condition(p.status, "SpecAccepted")
    assert (cond["status"], cond["reason"]) == ("False", "ImmutableFieldChanged")
    assert "spec.model.path" in cond["message"] and "replicas" not in cond["message"]
    config = next(m for m in p.ensure if m["kind"] == "ConfigMap")["data"]["config.yaml"]
    assert "/workspace/model" in config and "/other/model" not in config
    assert p.accepted["rollout"]["replicas"] == 3 and p.accepted["model"]["path"] == "/workspace/model"
    assert any(e.type == "Warning" and e.reason == "ImmutableFieldChanged" for e in p.events)


def test_a_spec_that_was_never_valid_fails_and_recovers_when_fixed() -> None:
    bad = body(algorithm={"mode": "ppo"})
    p = plan(bad, None, None)
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.algorithm.mode" in p.status["message"]
    assert p.ensure == [] and p.create_job is None and p.accepted is None and p.status["finalized"] is True
    fixed = plan(body(status=p.status), None, None)
    assert fixed.status["phase"] == "Pending" and fixed.ensure and fixed.accepted is not None
    assert fixed.status["completionTime"] is None and fixed.status["finalized"] is False


def test_an_invalid_edit_keeps_the_accepted_spec_running() -> None:
    obj = body(status={"phase": "Running"}, accepted=accepted_of(), algorithm={"mode": "ppo"})
    p = plan(obj, job(ready=1), READY)
    assert p.status["phase"] == "Running"
    cond = condition(p.status, "SpecAccepted")
    assert cond["reason"] == "InvalidSpec" and "spec.algorithm.mode" in cond["message"]


def test_unreachable_mlflow_holds_the_trainer_back_with_a_condition() -> None:
    seen = MlflowView(error="cannot reach MLflow at http://mlflow:5000: refused", unreachable=True)
    p = plan(body(mlflow={"trackingUri": "http://mlflow:5000"}), None, READY, mlflow=seen)
    assert p.create_job is None
    assert (p.status["phase"], p.status["reason"]) == ("Pending", "WaitingForMlflow")
    cond = condition(p.status, "MlflowReady")
    assert (cond["status"], cond["reason"]) == ("False", "MlflowUnreachable") and "refused" in cond["message"]
    ok = MlflowView(run_id="r9", experiment_id="1", url="http://mlflow:5000/#/experiments/1/runs/r9")
    started = plan(body(status=p.status, mlflow={"trackingUri": "http://mlflow:5000"}), None, READY, mlflow=ok)
    assert started.status["mlflow"]["runId"] == "r9"
    env = {e["name"]: e.get("value") for e in started.create_job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_RUN_ID"] == "r9"


def test_a_server_that_refused_the_operator_leaves_the_mlflow_run_to_the_trainer() -> None:
    """Delegated: MlflowReady is true with the reason, the trainer starts without MLFLOW_RUN_ID (it creates the run
    with the Secret it gets by secretKeyRef), the record remembers it, and the run finalizes without the model lookup
    and without marking an MLflow run failed."""
    mlflow = {
        "trackingUri": "https://mlflow.team-b.example",
        "credentialsSecret": {"name": "team-b-mlflow"},
        "registeredModelName": "policy",
    }
    why = "MLflow server https://mlflow.team-b.example:443 refused the operator's call (HTTP 401): ..."
    p = plan(body(mlflow=mlflow), None, READY, mlflow=MlflowView(delegated=why))
    cond = condition(p.status, "MlflowReady")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "TrainerCreatesRun", why)
    assert p.record[MLFLOW_DELEGATED] == why and "runId" not in p.status["mlflow"]
    env = {e["name"]: e for e in p.create_job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLFLOW_RUN_ID" not in env
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "team-b-mlflow"
    # Later passes observe nothing from MLflow (the controller no longer calls it): the record carries the decision.
    later = plan(body(status=p.status, record=p.record, mlflow=mlflow), job(0, ready=1), READY)
    assert condition(later.status, "MlflowReady")["reason"] == "TrainerCreatesRun"
    assert later.record[MLFLOW_DELEGATED] == why and later.status["phase"] == "Running"
    done = plan(body(status=later.status, record=later.record, mlflow=mlflow), job(0, condition="Complete"), None)
    assert done.status["phase"] == "Succeeded" and done.status["finalized"] is True
    assert not needs_model_version(parse_spec(body(mlflow=mlflow)["spec"]), done.record, job(0, condition="Complete"))
    spec = {"mlflow": mlflow, "failurePolicy": {"maxRestarts": 0}}
    failed = plan(body(status=later.status, record=later.record, **spec), job(0, condition="Failed"), READY)
    assert failed.status["phase"] == "Failed" and failed.fail_mlflow_run is None


def test_a_terminating_job_is_awaited_not_replaced() -> None:
    p = plan(body(status={"phase": "Restarting", "restarts": 1}), job(0, condition="Failed", terminating=True), READY)
    assert p.create_job is None and not p.delete_job and p.status["phase"] == "Restarting"


def test_full_reconcile_recreates_missing_supporting_children() -> None:
    running = plan(body(status={"phase": "Running"}), job(ready=1), READY, full=True)
    assert {"ConfigMap", "Service", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"} <= set(
        kinds(running.ensure)
    )
    timer = plan(body(status={"phase": "Running"}), job(ready=1), READY, full=False)
    assert timer.ensure == []


def test_reconciling_twice_changes_nothing_more() -> None:
    first = plan(body(status={"phase": "Running", "restarts": 0}), job(ready=1), READY)
    second = plan(body(status=first.status, accepted=first.accepted), job(ready=1), READY)
    assert {**first.status, **second.status} == first.status  # status is merge-patched
    assert second.events == [] and second.accepted is None
    assert (second.create_job, second.delete_job, second.scale_rollout, second.ensure) == (None, False, None, [])


# --- a forged status changes no decision ------------------------------------------------------------------------------

FORGED = {
    "phase": "Succeeded",
    "reason": "TrainerSucceeded",
    "restarts": 0,
    "finalized": True,
    "completionTime": NOW,
    "progress": {"step": 10, "totalSteps": 10},
    "mlflow": {"runId": "someone-elses"},
    "conditions": [{"type": "Succeeded", "status": "True", "reason": "Forged", "lastTransitionTime": NOW}],
}


def test_a_forged_status_changes_nothing_the_operator_decides() -> None:
    record = {"phase": "Restarting", "reason": "TrainerFailed", "restarts": 1, "mlflow": {"runId": "r1"}}
    mlflow = {"trackingUri": "http://mlflow:5000"}
    spec = {"failurePolicy": {"maxRestarts": 1}, "cleanup": {"onSuccess": "Delete"}, "mlflow": mlflow}
    running = plan(body(status=FORGED, record=record, **spec), job(1, ready=1), READY)
    assert (running.status["phase"], running.status["restarts"], running.status["finalized"]) == ("Running", 1, False)
    assert running.delete == [] and running.scale_rollout is None  # not finished, nothing cleaned up
    assert running.status["mlflow"]["runId"] == "r1" and "progress" not in running.status
    assert "Succeeded" not in {c["type"] for c in running.status["conditions"]}  # the patch replaces the list
    failed = plan(body(status=FORGED, record=running.record, **spec), job(1, condition="Failed"), READY)
    assert (failed.status["phase"], failed.status["reason"]) == ("Failed", "MaxRestartsExceeded")  # budget holds
    assert failed.create_job is None and failed.fail_mlflow_run == "r1"


def test_without_a_record_a_jobs_attempt_is_the_floor_of_the_restart_count() -> None:
    p = plan(body(status={"restarts": 0}, record={}, failurePolicy={"maxRestarts": 1}), job(1, condition="Failed"))
    assert (p.status["phase"], p.status["restarts"]) == ("Failed", 1)


def test_a_run_from_before_the_record_is_seeded_from_its_status_once() -> None:
    obj = body(status={"phase": "Succeeded", "reason": "TrainerSucceeded", "finalized": True, "restarts": 2})
    del obj["metadata"]["annotations"][RECORD_ANNOTATION]
    p = plan(obj, None, RolloutView(0, 0))  # its trainer Job gone long ago: not started again
    assert (p.status["phase"], p.status["restarts"], p.create_job, p.scale_rollout) == ("Succeeded", 2, None, None)
    assert p.record["finalized"] is True and p.record["restarts"] == 2


def report(step: int = 3, attempt: int = 0, **extra: Any) -> str:
    return json.dumps({"step": step, "totalSteps": 10, "reward": 0.5, "attempt": attempt, **extra})


def progress_plan(raw: str, record: dict[str, Any] | None = None, attempt: int = 0) -> Plan:
    obj = body(status={"phase": "Running"}, record={"phase": "Running", **(record or {})})
    run = RunView.from_body(obj)
    observed = Observed(job=job(attempt, ready=1), rollout=READY, progress=raw)
    return plan_run(run, resolve_spec(run), observed, NOW, full=False)


def test_a_progress_report_is_copied_once_checked() -> None:
    p = progress_plan(report())
    assert p.status["progress"] == {"step": 3, "totalSteps": 10, "reward": 0.5, "updatedTime": None}
    assert p.record["progress"] == p.status["progress"] and p.record["progressAttempt"] == 0
    for bad in (
        report(step=11),  # beyond totalSteps
        report(step=-1),
        json.dumps({"step": 3, "totalSteps": 99, "attempt": 0}),  # not the spec's totalSteps
        json.dumps({"step": "3", "totalSteps": 10, "attempt": 0}),  # no coercion
        report(reward=1e12),
        report(updatedTime="yesterday"),
        report(phase="Succeeded"),  # nothing but progress
        report(attempt=1),  # not the running attempt
        "{" + " " * 5000 + "}",
        "not json",
    ):
        assert "progress" not in progress_plan(bad).status, bad
    kept = progress_plan(report(step=2), record=p.record)  # behind this attempt's last report
    assert kept.status["progress"]["step"] == 3
    resumed = progress_plan(report(step=2, attempt=1), record=p.record, attempt=1)  # a restart resumes earlier
    assert resumed.status["progress"]["step"] == 2 and resumed.record["progressAttempt"] == 1
