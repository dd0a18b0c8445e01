"""Gang admission through Kueue: the Workload the operator drives, and the real operator under kopf against kmock.

The emulator serves the Workload and ResourceFlavor CRDs (their names, versions and scopes, not Kueue's schemas) and
the test plays Kueue: it writes the Workload's status (quota reserved and admitted with flavors, evicted, readmitted)
as Kueue's scheduler and controllers would. No real Kueue and no scheduler run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kueue_emulation import FLAVORS, GPU_TAINT, PRIORITY_CLASSES, WORKLOADS, admitted_status, cond, crd, flavor
from luffy_operator import kueue
from luffy_operator.api import parse_spec
from luffy_operator.manifests import RunRef, rollout_statefulset, trainer_job
from luffyrun_samples import valid_run
from operator_harness import JOBS, RUNS, STATEFULSETS, Cluster, InProcessOperator, kubectl, wait_for

REF = RunRef("demo", "team-a", "uid-1")
# --- the pure functions ---------------------------------------------------------------------------------------------


def queued_spec(**scheduling: Any):
    return parse_spec(valid_run(scheduling={"queueName": "team-a", **scheduling})["spec"])


def test_one_workload_with_both_pod_sets_their_requests_and_the_priority() -> None:
    spec = queued_spec(priorityClassName="training")
    sts, job = rollout_statefulset(REF, spec, 2), trainer_job(REF, spec, 0, None)
    sts["spec"]["template"]["metadata"]["annotations"] = {"kueue.x-k8s.io/podset-required-topology": "rack", "x": "y"}
    wl = kueue.workload(REF, spec, sts, job, 1000)
    assert wl["metadata"]["name"] == "demo-workload"
    assert wl["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert wl["metadata"]["ownerReferences"][0]["controller"] is True
    assert wl["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == "uid-1"
    assert wl["spec"]["queueName"] == "team-a"
    assert wl["spec"]["priorityClassRef"] == {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": "training"}
    assert wl["spec"]["priority"] == 1000
    rollout, trainer = wl["spec"]["podSets"]
    assert (rollout["name"], rollout["count"], trainer["name"], trainer["count"]) == ("rollout", 2, "trainer", 1)
    # Kueue charges the pods' requests: the pod sets carry the children's own pod specs.
    assert rollout["template"]["spec"] == sts["spec"]["template"]["spec"]
    assert trainer["template"]["spec"] == job["spec"]["template"]["spec"]
    assert rollout["template"]["metadata"]["annotations"] == {"kueue.x-k8s.io/podset-required-topology": "rack"}


def test_placement_unites_the_flavors_and_the_admission_checks_updates() -> None:
    obj = {
        "metadata": {"name": "demo-workload"},
        "spec": {"podSets": [{"name": "trainer", "count": 2}]},
        "status": {
            "admission": {
                "podSetAssignments": [
                    {
                        "name": "trainer",
                        "flavors": {"cpu": "cpu-pool", "nvidia.com/gpu": "a100"},
                        "topologyAssignment": {},
                    }
                ]
            },
            "admissionChecks": [
                {
                    "name": "prov",
                    "podSetUpdates": [{"name": "trainer", "nodeSelector": {"zone": "b"}, "labels": {"l": "1"}}],
                }
            ],
        },
    }
    flavors = {
        "cpu-pool": flavor("cpu-pool", {"pool": "cpu"}, []),
        "a100": flavor("a100", {"gpu": "a100"}, [GPU_TAINT]),
    }
    where = kueue.placement(kueue.WorkloadView.of(obj), "trainer", flavors)
    assert where.node_selector == {"gpu": "a100", "pool": "cpu", "zone": "b"}
    assert where.tolerations == [GPU_TAINT]
    assert where.labels == {"kueue.x-k8s.io/podset": "trainer", "l": "1"}
    assert not where.topology_gate  # an empty topologyAssignment asks for no gate
    with pytest.raises(kueue.PlacementError, match="ResourceFlavor a100"):
        kueue.placement(kueue.WorkloadView.of(obj), "trainer", {"cpu-pool": flavors["cpu-pool"]})


def test_a_topology_assignment_gates_the_pods_for_kueues_ungater() -> None:
    obj = {
        "metadata": {"name": "demo-workload"},
        "spec": {"podSets": [{"name": "trainer", "count": 1}]},
        "status": {
            "admission": {
                "podSetAssignments": [
                    {"name": "trainer", "flavors": {}, "topologyAssignment": {"levels": ["rack"], "domains": []}}
                ]
            }
        },
    }
    spec = queued_spec(nodeSelector={"pool": "gpu"})
    job = kueue.placed(trainer_job(REF, spec, 0, None), kueue.placement(kueue.WorkloadView.of(obj), "trainer", {}))
    template = job["spec"]["template"]
    assert template["spec"]["schedulingGates"] == [{"name": "kueue.x-k8s.io/topology"}]
    assert template["metadata"]["annotations"]["kueue.x-k8s.io/workload"] == "demo-workload"
    assert template["metadata"]["annotations"]["luffy.dev/attempt"] == "0"  # the operator's own kept
    assert template["metadata"]["labels"]["kueue.x-k8s.io/podset"] == "trainer"
    assert template["spec"]["nodeSelector"] == {"pool": "gpu"}  # the spec's own selector kept


def test_release_after_eviction_clears_the_admission_and_requeues() -> None:
    obj = {
        "metadata": {"name": "w", "generation": 2},
        "status": {
            **admitted_status("a", "a"),
            "conditions": [
                cond("QuotaReserved", True, "QuotaReserved"),
                cond("Admitted", True, "Admitted"),
                cond("Evicted", True, "Preempted", "preempted by a higher priority workload"),
            ],
        },
    }
    patch = kueue.released(obj, "2026-12-02T05:00:00Z")["status"]
    assert patch["admission"] is None
    by_type = {c["type"]: c for c in patch["conditions"]}
    assert (by_type["QuotaReserved"]["status"], by_type["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert by_type["Admitted"]["status"] == "False"
    assert (by_type["Requeued"]["status"], by_type["Requeued"]["reason"]) == ("True", "Preempted")
    assert by_type["Evicted"] == obj["status"]["conditions"][2]  # Kueue's own condition kept as it was
    assert by_type["QuotaReserved"]["lastTransitionTime"] == "2026-12-02T05:00:00Z"


# --- the real operator ----------------------------------------------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def test_gang_admission_eviction_and_readmission(cluster: Cluster, operator: InProcessOperator, tmp_path: Path) -> None:
    api = cluster.api
    api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd("Workload", "workloads", "Namespaced"))
    api.create(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd("ResourceFlavor", "resourceflavors", "Cluster")
    )
    api.create(FLAVORS, flavor("cpu-pool", {"pool": "cpu"}, []))
    api.create(FLAVORS, flavor("spot", {"pool": "spot"}, [GPU_TAINT]))
    api.create(
        PRIORITY_CLASSES,
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "training"}, "value": 500},
    )
    run = valid_run("gang", scheduling={"queueName": "team-a", "priorityClassName": "training"})
    uid = api.create(RUNS, run)["metadata"]["uid"]

    # Queued: one Workload, owned by the run; no StatefulSet, no Job.
    wl = wait_for("the Workload", lambda: api.get(f"{WORKLOADS}/gang-workload"))
    assert wl["metadata"]["ownerReferences"][0]["uid"] == uid
    assert [(p["name"], p["count"]) for p in wl["spec"]["podSets"]] == [("rollout", 2), ("trainer", 1)]
    assert wl["spec"]["priority"] == 500
    status = wait_for("Queued", lambda: (s := cluster.status("gang")).get("phase") == "Queued" and s)
    assert status["reason"] == "Pending"
    # kubectl get lr: the Phase printer column (the emulator serves no server-side tables, so read its jsonPath).
    assert kubectl(cluster, tmp_path / "kube-cache", "get", "lr", "gang", "-o", "jsonpath={.status.phase}") == "Queued"
    assert api.get(f"{STATEFULSETS}/gang-rollout") is None and api.get(f"{JOBS}/gang-trainer") is None

    # Kueue reserves quota and admits: both roles start with the flavors' placement.
    api.merge(f"{WORKLOADS}/gang-workload/status", {"status": admitted_status("cpu-pool", "spot")})
    sts = wait_for("the rollout StatefulSet", lambda: api.get(f"{STATEFULSETS}/gang-rollout"))
    assert sts["spec"]["replicas"] == 2
    assert pod_spec(sts)["nodeSelector"] == {"pool": "cpu"}
    assert sts["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/podset"] == "rollout"
    assert api.get(f"{JOBS}/gang-trainer") is None  # the trainer waits for the rollout, as without Kueue
    api.merge(f"{STATEFULSETS}/gang-rollout/status", {"status": {"replicas": 2, "readyReplicas": 2}})
    job = wait_for("the trainer Job", lambda: api.get(f"{JOBS}/gang-trainer"))
    assert pod_spec(job)["nodeSelector"] == {"pool": "spot"}
    assert pod_spec(job)["tolerations"] == [GPU_TAINT]
    assert "suspend" not in job["spec"] and job["metadata"]["annotations"]["luffy.dev/attempt"] == "0"
    status = cluster.status("gang")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Admitted"] == "True"
    api.merge(f"{JOBS}/gang-trainer/status", {"status": {"active": 1, "ready": 1}})
    wait_for("Running", lambda: cluster.status("gang").get("phase") == "Running")

    # Preempted: the trainer Job is deleted (its pods get SIGTERM and their grace period to checkpoint), the rollout
    # goes, and only then is the quota handed back.
    assert pod_spec(job)["terminationGracePeriodSeconds"] == 300
    evicted = cond("Evicted", True, "Preempted", "Preempted to accommodate a higher priority Workload")
    conditions = [*admitted_status("cpu-pool", "spot")["conditions"], evicted]
    api.merge(f"{WORKLOADS}/gang-workload/status", {"status": {"conditions": conditions}})
    wait_for(
        "both roles stopped",
        lambda: not api.get(f"{JOBS}/gang-trainer") and not api.get(f"{STATEFULSETS}/gang-rollout"),
    )
    released = wait_for(
        "the quota released",
        lambda: (w := api.get(f"{WORKLOADS}/gang-workload"))["status"].get("admission") is None and w,
    )
    by_type = {c["type"]: c for c in released["status"]["conditions"]}
    assert by_type["QuotaReserved"]["status"] == "False" and by_type["Requeued"]["status"] == "True"
    status = wait_for("Queued/Preempted", lambda: (s := cluster.status("gang")).get("reason") == "Preempted" and s)
    assert status["phase"] == "Queued" and status["restarts"] == 0  # an eviction is not a failure
    evicted_condition = next(c for c in status["conditions"] if c["type"] == "Evicted")
    assert (evicted_condition["status"], evicted_condition["reason"]) == ("True", "Preempted")
    assert any(e["reason"] == "Preempted" for e in cluster.events("gang"))

    # Readmitted elsewhere: both roles come back on the new flavor; the trainer resumes (checkpoint.resume auto).
    api.merge(f"{WORKLOADS}/gang-workload/status", {"status": admitted_status("spot", "cpu-pool")})
    sts = wait_for("the rollout again", lambda: api.get(f"{STATEFULSETS}/gang-rollout"))
    assert pod_spec(sts)["nodeSelector"] == {"pool": "spot"} and pod_spec(sts)["tolerations"] == [GPU_TAINT]
    api.merge(f"{STATEFULSETS}/gang-rollout/status", {"status": {"replicas": 2, "readyReplicas": 2}})
    job = wait_for("the trainer again", lambda: api.get(f"{JOBS}/gang-trainer"))
    assert pod_spec(job)["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in pod_spec(job)
    assert job["metadata"]["annotations"]["luffy.dev/attempt"] == "0"  # the same attempt: no restart counted
    assert cluster.status("gang")["restarts"] == 0

    # Finished: the Workload is marked Finished, so Kueue frees the quota.
    api.merge(
        f"{JOBS}/gang-trainer/status", {"status": {"active": 0, "conditions": [{"type": "Complete", "status": "True"}]}}
    )
    wait_for("Succeeded", lambda: cluster.status("gang").get("phase") == "Succeeded")
    done = wait_for(
        "Finished",
        lambda: any(
            c["type"] == "Finished" for c in (api.get(f"{WORKLOADS}/gang-workload")["status"].get("conditions") or [])
        ),
    )
    assert done
