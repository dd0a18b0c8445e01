"""The chart's RBAC: exactly the operator's verbs, no wildcards, in both modes; enough to create the trainer's Role;
and, with the real operator (kopf) driven through a run's lifecycle against the kmock emulator, every request it
makes is one the rendered rules allow (the emulator enforces no RBAC, so the check is made on its request log)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_cases import NAMESPACE, VALID
from chart_render import find, fullname, one, release_objects
from kueue_emulation import FLAVORS, GPU_TAINT, WORKLOADS, admitted_status, cond, crd, flavor
from luffy_operator import manifests
from luffy_operator.api import parse_spec
from luffy_operator.kube import RESOURCES
from luffy_operator.manifests import RunRef
from luffyrun_samples import valid_run
from operator_harness import JOBS, RUNS, STATEFULSETS, Cluster, HttpApi, InProcessOperator, emulated_cluster, wait_for

Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# What the operator does in the namespaces of its runs (operator/luffy_operator/{kube,controller,reconcile}.py, and
# kopf's finalizer, annotation and status patches and Events). Written out here so that a change to the chart's
# rules is a deliberate change to this list.
RUN_GRANTS: set[Grant] = {
    *{("luffy.dev", "luffyruns", v) for v in ("get", "list", "watch", "patch")},
    *{("luffy.dev", "luffyruns/status", v) for v in ("get", "patch")},
    ("luffy.dev", "luffyruns/finalizers", "update"),
    ("", "events", "create"),
    *{("", "configmaps", v) for v in ("get", "create", "patch")},
    ("", "persistentvolumeclaims", "create"),
    *{("", "services", v) for v in ("create", "patch", "delete")},
    *{("", "serviceaccounts", v) for v in ("create", "delete")},
    ("", "secrets", "create"),  # the run's control token; no get, list or watch
    *{("apps", "statefulsets", v) for v in ("get", "create", "patch", "delete")},
    *{("batch", "jobs", v) for v in ("get", "create", "delete")},
    *{("networking.k8s.io", "networkpolicies", v) for v in ("create", "delete")},
    *{("rbac.authorization.k8s.io", r, v) for r in ("roles", "rolebindings") for v in ("create", "delete")},
    *{("kueue.x-k8s.io", "workloads", v) for v in ("get", "create", "delete")},  # a queued run's own Workload
    ("kueue.x-k8s.io", "workloads/status", "patch"),  # quota handed back after an eviction, Finished
}
# Cluster-scoped and read-only: the flavors an admission names, a queued run's PriorityClass value.
CRD_GRANTS: set[Grant] = {
    *{("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")},
    ("kueue.x-k8s.io", "resourceflavors", "get"),
    ("scheduling.k8s.io", "priorityclasses", "get"),
}
NAMESPACE_GRANTS: set[Grant] = {("", "namespaces", v) for v in ("list", "watch")}
# Granted but not reached by the lifecycle the real operator is driven through below, and why each is needed.
UNEXERCISED: dict[Grant, str] = {
    ("luffy.dev", "luffyruns", "get"): "the trainer's Role grants it (RBAC escalation prevention)",
    ("luffy.dev", "luffyruns/status", "get"): "the trainer's Role grants it (RBAC escalation prevention)",
    ("luffy.dev", "luffyruns/finalizers", "update"): "checked by admission on creating a child with blockOwnerDeletion",
}


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    out = set()
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    out.add((group, resource, verb))
    return out


def operator_name(release: str) -> str:
    return f"{fullname(release)}-operator"


def cluster_grants(release: str) -> set[Grant]:
    return grants(one(release_objects(release), "ClusterRole", operator_name(release))["rules"])


def namespace_grants(release: str, namespace: str) -> set[Grant]:
    """What the operator may do in `namespace`: its ClusterRole plus a Role there, if any."""
    roles = find(release_objects(release), "Role", operator_name(release), namespace)
    return cluster_grants(release) | {g for role in roles for g in grants(role["rules"])}


def assert_bound(release: str, kind: str, namespace: str | None = None) -> None:
    binding_kind = {"ClusterRole": "ClusterRoleBinding", "Role": "RoleBinding"}[kind]
    binding = one(release_objects(release), binding_kind, operator_name(release), namespace)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": operator_name(release)}
    account = one(release_objects(release), "ServiceAccount", namespace=NAMESPACE)["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    deployment = one(release_objects(release), "Deployment", operator_name(release))
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_cluster_wide_mode_is_one_cluster_role_with_exactly_the_operators_verbs() -> None:
    # kopf lists namespaces only when it watches some of them, so cluster-wide mode does without.
    assert cluster_grants("luffy") == RUN_GRANTS | CRD_GRANTS
    assert not find(release_objects("luffy"), "Role") and not find(release_objects("luffy"), "RoleBinding")
    assert_bound("luffy", "ClusterRole")


def test_namespaced_mode_grants_run_verbs_only_in_the_watched_namespaces() -> None:
    assert cluster_grants("namespaced") == CRD_GRANTS | NAMESPACE_GRANTS
    watched = VALID["namespaced"]["operator"]["watchNamespaces"]
    assert sorted(r["metadata"]["namespace"] for r in find(release_objects("namespaced"), "Role")) == sorted(watched)
    for namespace in watched:
        assert namespace_grants("namespaced", namespace) == RUN_GRANTS | CRD_GRANTS | NAMESPACE_GRANTS
        assert_bound("namespaced", "Role", namespace)
    assert_bound("namespaced", "ClusterRole")
    assert namespace_grants("namespaced", "elsewhere") == CRD_GRANTS | NAMESPACE_GRANTS


@pytest.mark.parametrize("release", sorted(VALID))
def test_no_secret_can_be_read_in_any_mode(release: str) -> None:
    """The operator creates its per-run Secrets and reads none: no get/list/watch on Secrets anywhere."""
    roles = find(release_objects(release), "ClusterRole") + find(release_objects(release), "Role")
    secret_verbs = {v for role in roles for (_, resource, v) in grants(role["rules"]) if resource == "secrets"}
    assert secret_verbs <= {"create"}, (release, secret_verbs)
    if VALID[release].get("rbac", {}).get("create", True):
        assert secret_verbs == {"create"}, release


def test_operator_holds_what_it_grants_the_trainer() -> None:
    """RBAC forbids creating a Role that grants more than its creator holds (unless it may `escalate`)."""
    for role in (o for o in manifests.trainer_rbac(RunRef("r", "team-a", "uid")) if o["kind"] == "Role"):
        assert grants([{k: v for k, v in rule.items() if k != "resourceNames"} for rule in role["rules"]]) <= (
            namespace_grants("namespaced", "team-a")
        )


def test_operator_may_create_every_child_kind() -> None:
    spec = parse_spec(valid_run()["spec"])
    run = RunRef("r", "default", "uid")
    children = [
        *manifests.supporting_children(run, spec),
        manifests.trainer_job(run, spec, 0, None),
        manifests.rollout_statefulset(run, spec, 1),
    ]
    kinds = {(c["apiVersion"], c["kind"]) for c in children}
    assert kinds <= RESOURCES.keys()
    for api_version, kind in kinds:
        group = api_version.rpartition("/")[0]
        assert (group, RESOURCES[(api_version, kind)], "create") in cluster_grants("luffy"), kind


# --- what the real operator does ------------------------------------------------------------------------------------

VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def grant_of(method: str, path: str, params: dict[str, str]) -> tuple[Grant, str | None] | None:
    """The (group, resource, verb) a request needs and its namespace; None for discovery (allowed to everyone)."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    if method == "GET":
        verb = "get" if name else ("watch" if params.get("watch") in ("true", "1") else "list")
    else:
        verb = VERBS[method]
    return (group, f"{resource}/{sub}" if sub else resource, verb), namespace


class OperatorRun(InProcessOperator):
    """The real operator in a thread, with the requests it made to the emulator."""

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, query) of every request the operator made: kopf's and its kubernetes client's, not ours."""

        def collect(emulator: Any) -> list[tuple[str, str, dict[str, str]]]:
            return [
                (r.method.value, r.url.path, dict(r.params))
                for r in emulator
                if r.headers.get("User-Agent", "").startswith(("kopf/", "OpenAPI-Generator/"))
            ]

        return self.cluster.server.call(collect)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The operator reads its settings when handlers are first imported; a fast resync if this is first.
    monkeypatch.setenv("LUFFY_OPERATOR_RESYNC_SECONDS", "0.5")
    with emulated_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


def drive_a_run(api: HttpApi) -> None:
    """Create, fail once, restart, rescale, succeed with cleanup, delete: the operator's create, patch and delete
    paths. The test plays kubelet and Job controller by writing the children's status."""
    api.create(RUNS, valid_run("rbac", cleanup={"onSuccess": "Delete"}, failurePolicy={"maxRestarts": 2}))
    rollout, job = f"{STATEFULSETS}/rbac-rollout", f"{JOBS}/rbac-trainer"
    wait_for("the rollout", lambda: api.get(rollout))
    api.merge(f"{rollout}/status", {"status": {"replicas": 2, "readyReplicas": 2}})
    first = wait_for("the trainer", lambda: api.get(job))["metadata"]["uid"]
    failed = {"failed": 1, "active": 0, "conditions": [{"type": "Failed", "status": "True", "reason": "Test"}]}
    api.merge(f"{job}/status", {"status": failed})
    wait_for("the restart", lambda: (j := api.get(job)) and j["metadata"]["uid"] != first)
    api.merge(f"{RUNS}/rbac", {"spec": {"rollout": {"replicas": 3}}})
    wait_for("the rescale", lambda: api.get(rollout)["spec"]["replicas"] == 3)
    api.merge(f"{rollout}/status", {"status": {"replicas": 3, "readyReplicas": 3}})
    replicas = manifests.ROLLOUT_REPLICAS_ANNOTATION
    wait_for(
        "the trainer for 3 replicas", lambda: (j := api.get(job)) and j["metadata"]["annotations"][replicas] == "3"
    )
    done = {"succeeded": 1, "active": 0, "conditions": [{"type": "Complete", "status": "True", "reason": "Test"}]}
    api.merge(f"{job}/status", {"status": done})
    wait_for("the cleanup", lambda: api.get(job) is None and api.get(rollout) is None, timeout=30)
    api.delete(f"{RUNS}/rbac")
    wait_for("the run to go", lambda: api.get(f"{RUNS}/rbac") is None)
    drive_a_queued_run(api)


def drive_a_queued_run(api: HttpApi) -> None:
    """A run in a Kueue queue: its Workload created, replaced on a rescale before admission, admitted with a flavor,
    evicted and its quota handed back, finished. The test plays Kueue by writing the Workload's status."""
    for kind, plural, scope in (
        ("Workload", "workloads", "Namespaced"),
        ("ResourceFlavor", "resourceflavors", "Cluster"),
    ):
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd(kind, plural, scope))
    api.create(FLAVORS, flavor("spot", {"pool": "spot"}, [GPU_TAINT]))
    priority = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "p"}, "value": 1}
    api.create("/apis/scheduling.k8s.io/v1/priorityclasses", priority)
    api.create(RUNS, valid_run("rbacq", scheduling={"queueName": "q", "priorityClassName": "p"}))
    workload, rollout, job = f"{WORKLOADS}/rbacq-workload", f"{STATEFULSETS}/rbacq-rollout", f"{JOBS}/rbacq-trainer"
    wait_for("the Workload", lambda: api.get(workload))
    api.merge(f"{RUNS}/rbacq", {"spec": {"rollout": {"replicas": 3}}})
    wait_for("the Workload replaced", lambda: (w := api.get(workload)) and w["spec"]["podSets"][0]["count"] == 3)
    api.merge(f"{workload}/status", {"status": admitted_status("spot", "spot")})
    wait_for("the rollout", lambda: api.get(rollout))
    api.merge(f"{rollout}/status", {"status": {"replicas": 3, "readyReplicas": 3}})
    wait_for("the trainer", lambda: api.get(job))
    evicted = [*admitted_status("spot", "spot")["conditions"], cond("Evicted", True, "Preempted")]
    api.merge(f"{workload}/status", {"status": {"conditions": evicted}})
    wait_for("the quota handed back", lambda: "admission" not in (api.get(workload)["status"] or {}), timeout=30)
    api.delete(f"{RUNS}/rbacq")
    wait_for("the queued run to go", lambda: api.get(f"{RUNS}/rbacq") is None)


@pytest.mark.parametrize(("release", "options"), [("luffy", ["-A"]), ("namespaced", ["--namespace", "default"])])
def test_every_request_of_the_real_operator_is_allowed(cluster: Cluster, release: str, options: list[str]) -> None:
    with OperatorRun(cluster, options, timeout=60) as operator:
        drive_a_run(cluster.api)
        made = operator.requests()
    # The namespaced release watches team-a/team-b; here the operator watches `default`: its Role rules apply there.
    namespace_rules = namespace_grants(release, "team-a")
    denied = set()
    exercised = set()
    for method, path, params in made:
        needed = grant_of(method, path, params)
        if needed is None:
            continue
        grant, namespace = needed
        exercised.add(grant)
        if grant not in (namespace_rules if namespace else cluster_grants(release)):
            denied.add((method, path, grant))
    assert not denied, sorted(denied)
    # ... and nothing is granted that it does not do, or that is not explained in UNEXERCISED.
    granted = namespace_rules | cluster_grants(release)
    assert granted - exercised == set(UNEXERCISED) & granted, sorted(granted - exercised)
    # The lifecycle reached the operator's create, patch and delete paths (the check above is not vacuous).
    assert {("apps", "statefulsets", "patch"), ("batch", "jobs", "delete"), ("", "services", "patch")} <= exercised
    assert ("luffy.dev", "luffyruns/status", "patch") in exercised
