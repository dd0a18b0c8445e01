"""Lifecycle conventions, with the real operator (kopf) against the kmock emulator over HTTP: disruptions restart the
trainer without consuming maxRestarts, the run's deadline, delayed cleanup, deletion with no finalizer, and conditions
in the metav1.Condition schema.

The tests play the Job controller: they write the Failed condition it writes when a podFailurePolicy rule fires
(reason PodFailurePolicy, the rule's index in the message), when activeDeadlineSeconds passes (DeadlineExceeded) or
when backoffLimit is exceeded.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import yaml
from crd_validation import CrdValidator
from luffy_operator import manifests
from luffy_operator.api import parse_spec
from luffy_operator.manifests import RunRef
from luffy_operator.reconcile import is_disruption
from luffyrun_samples import valid_run
from operator_harness import CRD_PATH, JOBS, RUNS, STATEFULSETS, Cluster, InProcessOperator, wait_for
from test_operator_kopf import children_of, condition, finished, phase_is, set_job, set_rollout_ready

# What the Job controller writes (kubernetes pkg/controller/job/pod_failure_policy.go).
DISRUPTED = "Pod default/{name}-trainer-0-x7k2p has condition DisruptionTarget matching FailJob rule at index 0"
KOPF_FINALIZER = "luffy.dev/kopf-finalizer"


def job(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return cluster.api.get(f"{JOBS}/{name}-trainer")


def job_of_attempt(cluster: Cluster, name: str, attempt: int) -> Any:
    def probe() -> dict[str, Any] | None:
        obj = job(cluster, name)
        ok = obj is not None and obj["metadata"]["annotations"][manifests.ATTEMPT_ANNOTATION] == str(attempt)
        return obj if ok and not obj["metadata"].get("deletionTimestamp") else None

    return wait_for(f"trainer attempt {attempt}", probe)


def fail_job(cluster: Cluster, name: str, reason: str, message: str) -> None:
    set_job(
        cluster,
        name,
        active=0,
        ready=0,
        failed=1,
        conditions=[{"type": "Failed", "status": "True", "reason": reason, "message": message}],
    )


def started(cluster: Cluster, name: str, **spec: Any) -> str:
    """Create a run, make its rollout ready; returns its uid once the first trainer Job exists."""
    uid = cluster.api.create(RUNS, valid_run(name, **spec))["metadata"]["uid"]
    wait_for("the rollout", lambda: cluster.api.get(f"{STATEFULSETS}/{name}-rollout"))
    set_rollout_ready(cluster, name, 2)
    job_of_attempt(cluster, name, 0)
    return uid


def seconds(timestamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def test_the_job_controller_messages_tell_a_disruption_apart() -> None:
    """Only the disruption rule's FailJob message, with reason PodFailurePolicy, is a disruption."""
    assert is_disruption({"reason": "PodFailurePolicy", "message": DISRUPTED.format(name="a")})
    exit_code = "Container trainer for pod default/a-0 failed with exit code 1 matching FailJob rule at index 1"
    assert not is_disruption({"reason": "PodFailurePolicy", "message": exit_code})
    assert not is_disruption({"reason": "PodFailurePolicy", "message": DISRUPTED.replace("index 0", "index 10")})
    assert not is_disruption({"reason": "BackoffLimitExceeded", "message": DISRUPTED.format(name="a")})


def test_the_trainer_job_sends_disrupted_pods_to_its_failure_rule() -> None:
    ref = RunRef("gang", "default", "u1")
    spec = parse_spec(valid_run()["spec"])
    job_spec = manifests.trainer_job(ref, spec, 3, None, restarts=1, deadline_seconds=120)["spec"]
    rule = job_spec["podFailurePolicy"]["rules"][manifests.DISRUPTION_RULE]
    assert rule == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert (job_spec["backoffLimit"], job_spec["podReplacementPolicy"]) == (0, "Failed")
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert job_spec["activeDeadlineSeconds"] == 120
    annotations = manifests.trainer_job(ref, spec, 3, None, restarts=1)["metadata"]["annotations"]
    assert (annotations[manifests.ATTEMPT_ANNOTATION], annotations[manifests.RESTARTS_ANNOTATION]) == ("3", "1")


def test_disruptions_restart_uncounted_and_failures_count(cluster: Cluster, operator: InProcessOperator) -> None:
    started(cluster, "gang")  # maxRestarts 1
    # Two disruptions (more than maxRestarts): each restarts the trainer, neither is counted.
    for attempt in (0, 1):
        fail_job(cluster, "gang", "PodFailurePolicy", DISRUPTED.format(name="gang"))
        nxt = job_of_attempt(cluster, "gang", attempt + 1)
        assert nxt["metadata"]["annotations"][manifests.RESTARTS_ANNOTATION] == "0"
        status = cluster.status("gang")
        assert (status["restarts"], status["disruptions"]) == (0, attempt + 1), status
    assert any(e["reason"] == "TrainerDisrupted" for e in cluster.events("gang"))
    set_job(cluster, "gang", active=1, ready=1)
    wait_for("Running", phase_is(cluster, "gang", "Running"))
    assert cluster.status("gang")["trainer"]["attempt"] == 2

    # A real failure counts; the next one is beyond maxRestarts and fails the run.
    fail_job(cluster, "gang", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    job_of_attempt(cluster, "gang", 3)
    assert (cluster.status("gang")["restarts"], cluster.status("gang")["disruptions"]) == (1, 2)
    fail_job(cluster, "gang", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    status = wait_for("Failed", phase_is(cluster, "gang", "Failed", "MaxRestartsExceeded"))
    assert (status["restarts"], status["disruptions"]) == (1, 2)
    assert job(cluster, "gang")["metadata"]["annotations"][manifests.ATTEMPT_ANNOTATION] == "3"  # kept, no attempt 4

    # What the operator wrote fits the CRD's status schema (metav1.Condition's limits and patterns included).
    run = cluster.run("gang")
    obj = {k: run[k] for k in ("apiVersion", "kind", "spec", "status")} | {"metadata": {"name": "gang"}}
    assert CrdValidator(yaml.safe_load(CRD_PATH.read_text())).errors(obj) == []
    types = [c["type"] for c in status["conditions"]]
    assert len(types) == len(set(types)) and all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_a_job_past_the_runs_deadline_fails_the_run_uncounted(cluster: Cluster, operator: InProcessOperator) -> None:
    started(cluster, "late", activeDeadlineSeconds=3600)
    first = job(cluster, "late")["spec"]["activeDeadlineSeconds"]
    assert 3500 < first <= 3600  # what is left of the run's deadline
    fail_job(cluster, "late", "DeadlineExceeded", "Job was active longer than specified deadline")
    status = wait_for("Failed", phase_is(cluster, "late", "Failed", "DeadlineExceeded"))
    assert status["restarts"] == 0 and condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "spec.activeDeadlineSeconds (3600s" in status["message"]
    wait_for("rollout scaled to zero", lambda: cluster.api.get(f"{STATEFULSETS}/late-rollout")["spec"]["replicas"] == 0)
    assert job(cluster, "late")  # the failed Job stays for its logs (cleanup onFailure: Keep)
    assert any(e["reason"] == "DeadlineExceeded" and e["type"] == "Warning" for e in cluster.events("late"))


def test_the_deadline_is_the_runs_across_restarts(cluster: Cluster, operator: InProcessOperator) -> None:
    """The operator's own clock: a restarted Job gets only what is left, and a running one is stopped at the
    deadline, counted from the run's creation."""
    deadline = 15
    started(cluster, "brief", activeDeadlineSeconds=deadline)
    created = seconds(cluster.run("brief")["metadata"]["creationTimestamp"])
    wait_for("a second to pass", lambda: datetime.datetime.now(datetime.UTC) - created > datetime.timedelta(seconds=2))
    fail_job(cluster, "brief", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    second = job_of_attempt(cluster, "brief", 1)
    assert second["spec"]["activeDeadlineSeconds"] < deadline
    set_job(cluster, "brief", active=1, ready=1)
    status = wait_for("Failed", phase_is(cluster, "brief", "Failed", "DeadlineExceeded"), timeout=deadline + 20)
    assert seconds(status["completionTime"]) >= created + datetime.timedelta(seconds=deadline)
    assert status["restarts"] == 1
    wait_for("the running trainer stopped", lambda: job(cluster, "brief") is None)
    wait_for(
        "rollout scaled to zero", lambda: cluster.api.get(f"{STATEFULSETS}/brief-rollout")["spec"]["replicas"] == 0
    )
    set_rollout_ready(cluster, "brief", 0)
    wait_for("finalized", lambda: cluster.status("brief").get("finalized"))


def test_a_run_past_its_deadline_before_starting_fails(cluster: Cluster, operator: InProcessOperator) -> None:
    cluster.api.create(RUNS, valid_run("stuck", activeDeadlineSeconds=2))  # the rollout never gets ready
    status = wait_for("Failed", phase_is(cluster, "stuck", "Failed", "DeadlineExceeded"))
    assert job(cluster, "stuck") is None
    wait_for(
        "rollout scaled to zero", lambda: cluster.api.get(f"{STATEFULSETS}/stuck-rollout")["spec"]["replicas"] == 0
    )
    assert status["restarts"] == 0


def test_cleanup_waits_its_delay_after_completion(cluster: Cluster, operator: InProcessOperator) -> None:
    delay = 4
    uid = started(cluster, "tidy", cleanup={"onSuccess": "Delete", "delaySeconds": delay})
    set_job(cluster, "tidy", succeeded=1, **finished("Complete"))
    status = wait_for("Succeeded", phase_is(cluster, "tidy", "Succeeded"))
    assert job(cluster, "tidy") is not None and not status["finalized"]  # kept for its delay
    completed = seconds(status["completionTime"])
    wait_for("the trainer Job deleted", lambda: job(cluster, "tidy") is None, timeout=delay + 20)
    assert datetime.datetime.now(datetime.UTC) >= completed + datetime.timedelta(seconds=delay)
    wait_for("the rollout deleted", lambda: cluster.api.get(f"{STATEFULSETS}/tidy-rollout") is None)
    wait_for("finalized", lambda: cluster.status("tidy").get("finalized"))
    assert "ConfigMap/tidy-config" in children_of(cluster, uid)  # Delete keeps the ConfigMap and PVC


def test_a_run_is_deleted_while_the_operator_is_stopped(cluster: Cluster) -> None:
    """No finalizer: the API server deletes the run at once and the garbage collector takes its children. A run
    that still carries the finalizer of an older operator loses it on the next pass."""
    legacy = valid_run("legacy")
    legacy["metadata"]["finalizers"] = [KOPF_FINALIZER]
    with InProcessOperator(cluster):
        uid = started(cluster, "gone")
        set_job(cluster, "gone", active=1, ready=1)
        wait_for("Running", phase_is(cluster, "gone", "Running"))
        cluster.api.create(RUNS, legacy)
        wait_for(
            "the old finalizer removed",
            lambda: cluster.status("legacy").get("phase") and not cluster.run("legacy")["metadata"].get("finalizers"),
        )
    assert not cluster.run("gone")["metadata"].get("finalizers")
    assert children_of(cluster, uid)  # GPU pods' owners, until the run goes
    cluster.api.delete(f"{RUNS}/gone")
    assert cluster.run("gone") is None  # nobody had to release it
    wait_for("the children to go", lambda: children_of(cluster, uid) == {})
    cluster.api.delete(f"{RUNS}/legacy")
    assert cluster.run("legacy") is None


def test_condition_schema_is_metav1s() -> None:
    """The limits of metav1.Condition (k8s.io/apimachinery/pkg/apis/meta/v1/types.go), written out here."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["maxItems"] == 16
    item = conditions["items"]
    props = item["properties"]
    assert set(item["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    assert props["status"]["enum"] == ["True", "False", "Unknown"]
    assert props["reason"]["pattern"] == "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert (props["reason"]["minLength"], props["reason"]["maxLength"]) == (1, 1024)
    assert props["message"]["maxLength"] == 32768 and props["type"]["maxLength"] == 316
    assert props["lastTransitionTime"]["format"] == "date-time"
    assert props["observedGeneration"]["minimum"] == 0
    for reason in ("TrainerDisrupted", "Deadline_Exceeded", "a:b,c"):
        assert re.fullmatch(props["reason"]["pattern"], reason)
    for reason in ("Trainer Failed", "1Bad", "Bad:", ""):
        assert not re.fullmatch(props["reason"]["pattern"], reason)
