"""The real operator (kopf) against the kmock emulator over HTTP, with a real MLflow server.

The emulator runs no controllers: the tests play kubelet and Job controller by patching the StatefulSet's and Job's
status, and the shim's garbage collector removes owned children when their LuffyRun goes. Faults are injected as
emulator reactions (an API server answering 422 or 503) or as an exception inside the operator's own code.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
import uuid
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from luffy_operator import manifests
from luffy_operator.api import parse_spec
from luffy_operator.manifests import RunRef
from luffy_operator.mlflow_rest import MlflowRestClient
from luffy_operator.settings import OperatorSettings
from luffy_trainer.k8s_status import ProgressReporter
from luffyrun_samples import INVALID_CASES, invalid_run, names_field, valid_run
from operator_harness import (
    ACCOUNTS,
    BINDINGS,
    CLAIMS,
    CONFIGMAPS,
    JOBS,
    POLICIES,
    ROLES,
    RUNS,
    SECRETS,
    SERVICES,
    STATEFULSETS,
    Cluster,
    InProcessOperator,
    wait_for,
)
from servers import free_port

SETTINGS = OperatorSettings.from_env()

CHILDREN = [CONFIGMAPS, SERVICES, ACCOUNTS, CLAIMS, STATEFULSETS, POLICIES, ROLES, BINDINGS]


def children_of(cluster: Cluster, uid: str) -> dict[str, str]:
    """kind/name -> uid of every object owned by the LuffyRun with this uid."""
    out = {}
    for path in [*CHILDREN, JOBS]:
        for item in cluster.api.request("GET", path)["items"]:
            md = item["metadata"]
            if any(ref["uid"] == uid for ref in md.get("ownerReferences", [])):
                out[f"{item['kind']}/{md['name']}"] = md["uid"]
    return out


def job_env(cluster: Cluster, name: str) -> dict[str, Any]:
    job = cluster.api.get(f"{JOBS}/{name}-trainer")
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def server_urls(cluster: Cluster, name: str) -> list[str]:
    """The rollout server URLs the trainer config in the run's ConfigMap names."""
    config = yaml.safe_load(cluster.api.get(f"{CONFIGMAPS}/{name}-config")["data"]["config.yaml"])
    return config["rollout"]["server_urls"]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def set_rollout_ready(cluster: Cluster, name: str, ready: int) -> None:
    cluster.api.merge(f"{STATEFULSETS}/{name}-rollout/status", {"status": {"replicas": ready, "readyReplicas": ready}})


def set_job(cluster: Cluster, name: str, **status: Any) -> None:
    cluster.api.merge(f"{JOBS}/{name}-trainer/status", {"status": status})


def finished(type_: str) -> dict[str, Any]:
    return {"active": 0, "ready": 0, "conditions": [{"type": type_, "status": "True", "reason": "Test"}]}


def phase_is(cluster: Cluster, name: str, phase: str, reason: str | None = None):
    def probe() -> dict[str, Any] | None:
        status = cluster.status(name)
        ok = status.get("phase") == phase and reason in (None, status.get("reason"))
        return status if ok else None

    return probe


def mlflow_get(url: str, endpoint: str, **query: str) -> dict[str, Any]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{q}", timeout=10) as r:
        return json.loads(r.read())


def mlflow_post(url: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def reporter_for(cluster: Cluster, name: str, attempt: int = 0) -> ProgressReporter:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=config)
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))
    return ProgressReporter(name, "default", api, min_interval_s=0, attempt=attempt)


def test_lifecycle_from_create_to_delete(cluster: Cluster, operator: InProcessOperator, mlflow_uri: str) -> None:
    model_name = f"policy-{uuid.uuid4().hex[:8]}"
    cluster.api.create(
        SECRETS,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow-creds"}, "data": {"username": "dXNlcg=="}},
    )
    run = valid_run(
        "life",
        mlflow={
            "trackingUri": mlflow_uri,
            "experimentName": "luffy-kopf",
            "registeredModelName": model_name,
            "credentialsSecret": {"name": "mlflow-creds"},
        },
    )
    uid = cluster.api.create(RUNS, run)["metadata"]["uid"]

    # Children, the MLflow run, and no trainer until the rollout is ready.
    status = wait_for("Pending/WaitingForRollout", phase_is(cluster, "life", "Pending", "WaitingForRollout"))
    owned = wait_for("all children", lambda: len(children_of(cluster, uid)) == 11 and children_of(cluster, uid))
    assert set(owned) == {
        "ConfigMap/life-config",
        "ConfigMap/life-progress",
        "Service/life-rollout",
        "Service/life-trainer",
        "StatefulSet/life-rollout",
        "NetworkPolicy/life-rollout",
        "NetworkPolicy/life-trainer",
        "ServiceAccount/life-trainer",
        "Role/life-trainer",
        "RoleBinding/life-trainer",
        "PersistentVolumeClaim/life-checkpoints",
    }
    run_id = status["mlflow"]["runId"]
    tags = {t["key"]: t["value"] for t in mlflow_get(mlflow_uri, "runs/get", run_id=run_id)["run"]["data"]["tags"]}
    assert tags["luffy.uid"] == uid
    assert condition(status, "MlflowReady")["status"] == "True"
    assert cluster.api.get(f"{JOBS}/life-trainer") is None

    set_rollout_ready(cluster, "life", 2)
    wait_for("the trainer Job", lambda: cluster.api.get(f"{JOBS}/life-trainer"))
    first_env = job_env(cluster, "life")
    assert first_env["MLFLOW_RUN_ID"] == run_id
    assert len(server_urls(cluster, "life")) == 2
    set_job(cluster, "life", active=1, ready=1)
    status = wait_for("Running", phase_is(cluster, "life", "Running"))
    assert status["startTime"]

    # The trainer's progress report, checked and copied into status, survives the operator's own status updates.
    reporter_for(cluster, "life").report(step=3, total_steps=10, reward=0.25)
    wait_for("progress", lambda: cluster.status("life").get("progress", {}).get("step") == 3)
    set_rollout_ready(cluster, "life", 1)
    wait_for("the operator's next status", lambda: cluster.status("life")["rollout"]["ready"] == 1)
    progress = cluster.status("life")["progress"]
    assert (progress["step"], progress["totalSteps"], progress["reward"]) == (3, 10, 0.25)
    set_rollout_ready(cluster, "life", 2)

    # A trainer failure: counted once, then a new Job (attempt 1) that continues the same MLflow run.
    first_uid = cluster.api.get(f"{JOBS}/life-trainer")["metadata"]["uid"]
    set_job(cluster, "life", failed=1, **finished("Failed"))
    wait_for(
        "the restart", lambda: (job := cluster.api.get(f"{JOBS}/life-trainer")) and job["metadata"]["uid"] != first_uid
    )
    job = cluster.api.get(f"{JOBS}/life-trainer")
    assert job["metadata"]["annotations"]["luffy.dev/attempt"] == "1"
    assert job_env(cluster, "life")["MLFLOW_RUN_ID"] == run_id
    assert cluster.status("life")["restarts"] == 1
    set_job(cluster, "life", active=1, ready=1)
    wait_for("Running again", phase_is(cluster, "life", "Running"))

    # Scale the rollout: StatefulSet and trainer Service follow, the trainer restarts with 3 endpoints, uncounted.
    cluster.api.merge(f"{RUNS}/life", {"spec": {"rollout": {"replicas": 3}}})
    wait_for("3 replicas", lambda: cluster.api.get(f"{STATEFULSETS}/life-rollout")["spec"]["replicas"] == 3)
    set_rollout_ready(cluster, "life", 3)
    wait_for(
        "3 endpoints",
        lambda: (
            (job := cluster.api.get(f"{JOBS}/life-trainer"))
            and job["metadata"]["annotations"]["luffy.dev/rollout-replicas"] == "3"
            and len(server_urls(cluster, "life")) == 3
        ),
    )
    trainer_ports = cluster.api.get(f"{SERVICES}/life-trainer")["spec"]["ports"]
    assert [p["port"] for p in trainer_ports] == [29500, 29600, 29601, 29602]
    assert cluster.status("life")["restarts"] == 1

    # An immutable field: refused with a condition and an Event, the children keep the accepted model.
    config_before = cluster.api.get(f"{CONFIGMAPS}/life-config")["data"]
    cluster.api.merge(f"{RUNS}/life", {"spec": {"model": {"path": "/somewhere/else"}}})
    refused = wait_for(
        "the refusal",
        lambda: condition(cluster.status("life"), "SpecAccepted").get("reason") == "ImmutableFieldChanged",
    )
    assert "spec.model.path" in condition(cluster.status("life"), "SpecAccepted")["message"] and refused
    assert cluster.api.get(f"{CONFIGMAPS}/life-config")["data"] == config_before
    cluster.api.merge(f"{RUNS}/life", {"spec": {"model": {"path": "/workspace/model"}}})
    wait_for("acceptance again", lambda: condition(cluster.status("life"), "SpecAccepted").get("status") == "True")

    # Suspend and resume.
    cluster.api.merge(f"{RUNS}/life", {"spec": {"suspend": True}})
    wait_for("Suspended", phase_is(cluster, "life", "Suspended"))
    wait_for("no trainer", lambda: cluster.api.get(f"{JOBS}/life-trainer") is None)
    assert cluster.api.get(f"{STATEFULSETS}/life-rollout")["spec"]["replicas"] == 0
    set_rollout_ready(cluster, "life", 0)
    cluster.api.merge(f"{RUNS}/life", {"spec": {"suspend": False}})
    wait_for("rollout back", lambda: cluster.api.get(f"{STATEFULSETS}/life-rollout")["spec"]["replicas"] == 3)
    set_rollout_ready(cluster, "life", 3)
    wait_for("the trainer after resume", lambda: cluster.api.get(f"{JOBS}/life-trainer"))
    assert cluster.api.get(f"{JOBS}/life-trainer")["metadata"]["annotations"]["luffy.dev/attempt"] == "1"

    # Success: the trainer registered a model version; the rollout goes to zero; the version is recorded.
    mlflow_post(mlflow_uri, "registered-models/create", {"name": model_name})
    version = {"name": model_name, "source": f"runs:/{run_id}/model", "run_id": run_id}
    mlflow_post(mlflow_uri, "model-versions/create", version)
    set_job(cluster, "life", succeeded=1, **finished("Complete"))
    status = wait_for("Succeeded", phase_is(cluster, "life", "Succeeded", "TrainerSucceeded"))
    wait_for("rollout scaled to zero", lambda: cluster.api.get(f"{STATEFULSETS}/life-rollout")["spec"]["replicas"] == 0)
    set_rollout_ready(cluster, "life", 0)
    status = wait_for("finalized", lambda: cluster.status("life").get("finalized") and cluster.status("life"))
    assert status["mlflow"]["modelVersion"] == "1" and status["mlflow"]["modelName"] == model_name
    assert status["completionTime"] and status["restarts"] == 1

    reasons = {e["reason"] for e in cluster.events("life")}
    expected = {"WaitingForRollout", "TrainerStarting", "TrainerRunning", "TrainerFailed", "RolloutRescaled"}
    assert expected | {"ImmutableFieldChanged", "Suspended", "TrainerSucceeded"} <= reasons
    warnings = {e["reason"] for e in cluster.events("life") if e["type"] == "Warning"}
    assert {"TrainerFailed", "ImmutableFieldChanged"} <= warnings

    # Delete: kopf releases its finalizer, owner references take the children; nothing is re-created.
    cluster.api.delete(f"{RUNS}/life")
    wait_for("the run to go", lambda: cluster.run("life") is None)
    wait_for("the children to go", lambda: children_of(cluster, uid) == {})
    posts = cluster.requests("POST", "/namespaces/default/")
    time.sleep(3 * SETTINGS.resync_seconds)  # what a forgotten timer would do, it would do now
    assert cluster.requests("POST", "/namespaces/default/") - posts == 0
    assert all(cluster.api.names(path) == [] for path in [STATEFULSETS, JOBS, CONFIGMAPS])


def test_failures_beyond_max_restarts_fail_the_run(
    cluster: Cluster, operator: InProcessOperator, mlflow_uri: str
) -> None:
    mlflow = {"trackingUri": mlflow_uri, "experimentName": "luffy-kopf"}
    uid = cluster.api.create(RUNS, valid_run("doomed", mlflow=mlflow, failurePolicy={"maxRestarts": 1}))["metadata"][
        "uid"
    ]
    wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/doomed-rollout"))
    set_rollout_ready(cluster, "doomed", 2)
    for attempt in (0, 1):
        wait_for(
            f"attempt {attempt}",
            lambda a=attempt: (
                (job := cluster.api.get(f"{JOBS}/doomed-trainer"))
                and job["metadata"]["annotations"]["luffy.dev/attempt"] == str(a)
            ),
        )
        set_job(cluster, "doomed", failed=1, **finished("Failed"))
    status = wait_for("Failed", phase_is(cluster, "doomed", "Failed", "MaxRestartsExceeded"))
    assert status["restarts"] == 1 and condition(status, "Failed")["status"] == "True"
    assert "attempt 1 failed" in status["message"]
    wait_for(
        "rollout scaled to zero", lambda: cluster.api.get(f"{STATEFULSETS}/doomed-rollout")["spec"]["replicas"] == 0
    )
    run = mlflow_get(mlflow_uri, "runs/get", run_id=status["mlflow"]["runId"])["run"]
    assert run["info"]["status"] == "FAILED"
    assert cluster.api.get(f"{JOBS}/doomed-trainer")  # kept for its logs (cleanup onFailure: Keep)
    assert "Job/doomed-trainer" in children_of(cluster, uid)


def test_an_operator_restart_converges_without_duplicates(cluster: Cluster) -> None:
    with InProcessOperator(cluster):
        uid = cluster.api.create(RUNS, valid_run("steady"))["metadata"]["uid"]
        wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/steady-rollout"))
        set_rollout_ready(cluster, "steady", 2)
        wait_for("the trainer", lambda: cluster.api.get(f"{JOBS}/steady-trainer"))
        set_job(cluster, "steady", active=1, ready=1)
        wait_for("Running", phase_is(cluster, "steady", "Running"))
        before = children_of(cluster, uid)
        status_before = cluster.status("steady")
    creates = cluster.requests("POST", "/namespaces/default/")
    supporting = len(manifests.supporting_children(RunRef("steady", "default", uid), parse_spec(valid_run()["spec"])))
    job_reads = cluster.requests("GET", "/jobs/steady-trainer")
    with InProcessOperator(cluster):
        # The resume handler re-runs the full reconcile: it tries every create (and is told they exist).
        wait_for("the resume pass", lambda: cluster.requests("POST", "/namespaces/default/") - creates >= supporting)
        wait_for("two timer passes", lambda: cluster.requests("GET", "/jobs/steady-trainer") - job_reads >= 3)
        after = children_of(cluster, uid)
        status_after = cluster.status("steady")
    assert after == before  # same objects, same uids: nothing deleted or duplicated
    assert status_after["phase"] == "Running" and status_after["restarts"] == status_before["restarts"] == 0
    assert status_after["startTime"] == status_before["startTime"]


def test_invalid_runs_get_a_condition_naming_the_field(cluster: Cluster, operator: InProcessOperator) -> None:
    """The emulator enforces no schema, so every invalid run reaches the operator: none may crash it."""
    names = {}
    for i, (case_id, _, field) in enumerate(INVALID_CASES):
        obj = invalid_run(case_id, name=f"bad-{i}")
        cluster.api.create(RUNS, obj)
        names[obj["metadata"]["name"]] = (case_id, field)

    def all_refused() -> bool:
        return all(cluster.status(n).get("reason") == "InvalidSpec" for n in names)

    wait_for("every invalid run to be refused", all_refused, timeout=60, interval=0.5)
    for name, (case_id, field) in names.items():
        status = cluster.status(name)
        assert status["phase"] == "Failed", case_id
        cond = condition(status, "SpecAccepted")
        assert cond["status"] == "False" and names_field(cond["message"], field), (case_id, cond["message"])
        assert cluster.api.get(f"{CONFIGMAPS}/{name}-config") is None, case_id
        assert any(e["type"] == "Warning" for e in cluster.events(name)), case_id
    cluster.api.create(RUNS, valid_run("fine"))
    wait_for("a valid run after them", lambda: cluster.api.get(f"{STATEFULSETS}/fine-rollout"))


def test_an_unreachable_mlflow_uri_holds_the_run_with_a_condition(
    cluster: Cluster, operator: InProcessOperator
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cluster.api.create(RUNS, valid_run("offline", mlflow={"trackingUri": dead}))
    wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/offline-rollout"))
    set_rollout_ready(cluster, "offline", 2)
    status = wait_for("the condition", lambda: condition(cluster.status("offline"), "MlflowReady").get("reason"))
    status = cluster.status("offline")
    cond = condition(status, "MlflowReady")
    assert (cond["status"], cond["reason"]) == ("False", "MlflowUnreachable") and dead in cond["message"]
    wait_for("WaitingForMlflow", phase_is(cluster, "offline", "Pending", "WaitingForMlflow"))
    assert cluster.api.get(f"{JOBS}/offline-trainer") is None


def test_a_forged_status_changes_nothing_the_operator_decides(cluster: Cluster, operator: InProcessOperator) -> None:
    """What a workload with write access to the status (the trainer's old Role) could do: reset the restart budget,
    claim success, stop the timer, plant conditions and progress. The operator decides from its record and the
    children, and rebuilds the status."""
    run = valid_run("forged", failurePolicy={"maxRestarts": 1}, cleanup={"onSuccess": "Delete"})
    cluster.api.create(RUNS, run)
    wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/forged-rollout"))
    set_rollout_ready(cluster, "forged", 2)
    wait_for("attempt 0", lambda: cluster.api.get(f"{JOBS}/forged-trainer"))
    first = cluster.api.get(f"{JOBS}/forged-trainer")["metadata"]["uid"]
    set_job(cluster, "forged", failed=1, **finished("Failed"))
    wait_for("attempt 1", lambda: (j := cluster.api.get(f"{JOBS}/forged-trainer")) and j["metadata"]["uid"] != first)
    set_job(cluster, "forged", active=1, ready=1)
    wait_for("Running", phase_is(cluster, "forged", "Running"))
    assert cluster.status("forged")["restarts"] == 1

    forged = {
        "phase": "Succeeded",
        "reason": "TrainerSucceeded",
        "restarts": 0,
        "finalized": True,
        "completionTime": "2026-01-01T00:00:00Z",
        "conditions": [
            {"type": "Succeeded", "status": "True", "reason": "Forged", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
        "progress": {"step": 10, "totalSteps": 10, "reward": 1.0},
    }
    cluster.api.merge(f"{RUNS}/forged/status", {"status": forged})
    reporter_for(cluster, "forged", attempt=1).report(step=4, total_steps=10, reward=0.5)

    def rebuilt() -> dict[str, Any] | None:
        s = cluster.status("forged")
        ok = (s.get("phase"), s.get("restarts"), s.get("finalized"), s.get("progress", {}).get("step")) == (
            "Running",
            1,
            False,
            4,
        )
        return s if ok else None

    status = wait_for("the status rebuilt by the timer", rebuilt)
    assert "Succeeded" not in {c["type"] for c in status["conditions"]} and status.get("completionTime") is None
    assert cluster.api.get(f"{STATEFULSETS}/forged-rollout")["spec"]["replicas"] == 2  # not scaled down
    assert cluster.api.get(f"{JOBS}/forged-trainer")["metadata"]["uid"] != first  # attempt 1 runs on, not deleted

    cluster.api.merge(f"{RUNS}/forged/status", {"status": {"restarts": 0}})
    set_job(cluster, "forged", failed=1, **finished("Failed"))
    status = wait_for("the budget enforced", phase_is(cluster, "forged", "Failed", "MaxRestartsExceeded"))
    assert status["restarts"] == 1 and cluster.api.get(f"{JOBS}/forged-trainer")  # kept (cleanup onFailure: Keep)


# --- every failed pass ends in a condition and an Event; permanent ones stop, transient ones back off --------------


def reconciled(cluster: Cluster, name: str, reason: str) -> Any:
    def probe() -> dict[str, Any] | None:
        cond = condition(cluster.status(name), "Reconciled")
        return cond if cond.get("reason") == reason else None

    return probe


def warnings(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events(name) if e["type"] == "Warning" and e["reason"] == reason]


def fail_requests(cluster: Cluster, method: str, path: str, status: int, while_: Any = lambda: True) -> list[float]:
    """Make the emulator answer `status` to `method` requests on `path` while `while_()`; returns the times of the
    failed requests as they come. (Reads: the emulator applies a write before a reaction answers it.)"""
    times: list[float] = []

    def matches(request: Any) -> bool:
        hit = request.method.value == method and str(request.url.path) == path and while_()
        if hit:
            times.append(time.monotonic())
        return hit

    error = kmock.KubernetesError(status=status, reason="Injected", message=f"injected {status}")
    cluster.server.call(lambda emulator: emulator[matches] << (lambda _: error))
    return times


def test_an_unexpected_exception_is_a_permanent_error_and_not_retried(
    cluster: Cluster, operator: InProcessOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's silent loop: the MLflow client raising something other than MlflowError (http.client's InvalidURL
    for a non-numeric port). Now: a condition, a Warning Event, no retry until the spec changes."""
    calls: list[float] = []

    def broken(self: MlflowRestClient, *args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        raise http.client.InvalidURL("nonnumeric port: 'abc'")

    monkeypatch.setattr(MlflowRestClient, "ensure_run", broken)
    cluster.api.create(RUNS, valid_run("broken", mlflow={"trackingUri": "http://mlflow:5000"}))
    cond = wait_for("the condition", reconciled(cluster, "broken", "PermanentError"))
    assert cond["status"] == "False" and "InvalidURL: nonnumeric port" in cond["message"]
    wait_for("the Warning Event", lambda: warnings(cluster, "broken", "PermanentError"))
    time.sleep(2 * SETTINGS.resync_seconds)  # a timer pass already under way may still end
    seen = len(calls)
    time.sleep(6 * SETTINGS.resync_seconds)
    assert len(calls) == seen <= 2, calls  # the create pass and at most one timer pass: no loop
    assert cluster.api.get(f"{STATEFULSETS}/broken-rollout") is None  # the pass stopped before acting

    monkeypatch.undo()  # the cause fixed, a spec edit retries
    cluster.api.merge(f"{RUNS}/broken", {"spec": {"rollout": {"replicas": 1}}})
    wait_for("recovery", reconciled(cluster, "broken", "ReconcileSucceeded"))
    wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/broken-rollout"))


def test_a_4xx_from_the_api_server_is_a_permanent_error_and_not_retried(
    cluster: Cluster, operator: InProcessOperator
) -> None:
    failed = fail_requests(cluster, "GET", f"{JOBS}/rejected-trainer", 403)
    cluster.api.create(RUNS, valid_run("rejected"))
    cond = wait_for("the condition", reconciled(cluster, "rejected", "PermanentError"))
    assert "jobs/rejected-trainer" in cond["message"] and "403" in cond["message"]
    wait_for("the Warning Event", lambda: warnings(cluster, "rejected", "PermanentError"))
    time.sleep(2 * SETTINGS.resync_seconds)
    seen = len(failed)
    time.sleep(6 * SETTINGS.resync_seconds)
    assert len(failed) == seen <= 2, failed


def test_a_transient_error_backs_off_and_recovers(cluster: Cluster, operator: InProcessOperator) -> None:
    down = [True]
    failed = fail_requests(cluster, "GET", f"{JOBS}/flaky-trainer", 503, while_=lambda: down[0])
    cluster.api.create(RUNS, valid_run("flaky"))
    cond = wait_for("the condition", reconciled(cluster, "flaky", "TransientError"))
    assert cond["status"] == "False" and "503" in cond["message"]
    wait_for("three tries of each path", lambda: len(warnings(cluster, "flaky", "TransientError")) >= 6, timeout=30)
    delays = {e["message"].rsplit(" in ", 1)[-1] for e in warnings(cluster, "flaky", "TransientError")}
    base = SETTINGS.resync_seconds
    assert {f"{base:g}s)", f"{2 * base:g}s)", f"{4 * base:g}s)"} <= delays, delays  # doubling
    window = [t for t in failed if t - failed[0] < 12 * base]
    assert len(window) <= 10, window  # two retrying paths (create handler, timer) at a constant resync: 24

    down[0] = False
    wait_for("recovery", reconciled(cluster, "flaky", "ReconcileSucceeded"), timeout=60)
    assert cluster.api.get(f"{CONFIGMAPS}/flaky-config") and cluster.api.get(f"{STATEFULSETS}/flaky-rollout")
    wait_for("WaitingForRollout", phase_is(cluster, "flaky", "Pending", "WaitingForRollout"))
