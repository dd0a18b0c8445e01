"""The chart's pods are bounded and probed: requests and limits on every container, a size limit on every emptyDir
with an ephemeral-storage request for it, the operator's readiness probe on kopf's endpoint, and NetworkPolicies for
both pods; the values change each of them."""

from __future__ import annotations

from typing import Any

import pytest
from chart_cases import VALID
from chart_render import find, fullname, one, release_objects
from kubernetes.utils import parse_quantity

Obj = dict[str, Any]


def pods(release: str) -> dict[str, Obj]:
    """component -> pod spec of each Deployment the release renders."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]
        for d in find(release_objects(release), "Deployment")
    }


@pytest.mark.parametrize("release", sorted(VALID))
def test_every_container_and_emptydir_is_bounded(release: str) -> None:
    for component, pod in pods(release).items():
        empty_dirs = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
        assert empty_dirs and all(d.get("sizeLimit") for d in empty_dirs.values()), (release, component)
        for container in pod["containers"]:
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert requests[resource] and limits[resource], (release, component, resource)
                assert parse_quantity(requests[resource]) <= parse_quantity(limits[resource])
            assert parse_quantity(requests["ephemeral-storage"]) >= parse_quantity(empty_dirs["tmp"]["sizeLimit"])


def test_defaults() -> None:
    operator, mlflow = pods("mlflow-sqlite")["operator"], pods("mlflow-sqlite")["mlflow"]
    assert operator["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "64Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    assert mlflow["containers"][0]["resources"] == {
        "requests": {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "20Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert {v["name"]: v["emptyDir"] for v in operator["volumes"]} == {"tmp": {"sizeLimit": "64Mi"}}
    assert next(v["emptyDir"] for v in mlflow["volumes"] if v["name"] == "tmp") == {"sizeLimit": "20Gi"}


def test_values_set_resources_and_sizes() -> None:
    operator = pods("customized")["operator"]
    assert operator["containers"][0]["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi", "ephemeral-storage": "32Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert operator["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "32Mi"}}]
    assert operator["containers"][0]["readinessProbe"]["periodSeconds"] == 30
    mlflow = pods("mlflow-postgres-pvc")["mlflow"]
    # The values' own ephemeral-storage request is kept; Helm merges the default limits in.
    assert mlflow["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "8Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert next(v["emptyDir"] for v in mlflow["volumes"] if v["name"] == "tmp") == {"sizeLimit": "4Gi"}


@pytest.mark.parametrize("release", ["luffy", "customized"])
def test_operator_is_ready_and_live_on_kopfs_health_endpoint(release: str) -> None:
    (container,) = pods(release)["operator"]["containers"]
    assert container["readinessProbe"]["httpGet"] == container["livenessProbe"]["httpGet"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_only_the_operator_mounts_a_service_account_token() -> None:
    """The operator calls the API server; MLflow does not."""
    assert pods("mlflow-sqlite")["operator"].get("automountServiceAccountToken", True) is True
    assert pods("mlflow-sqlite")["mlflow"]["automountServiceAccountToken"] is False


def policy_for(release: str, component: str) -> Obj:
    return one(release_objects(release), "NetworkPolicy", f"{fullname(release)}-{component}")


@pytest.mark.parametrize("release", ["luffy", "mlflow-sqlite", "mlflow-postgres-pvc"])
def test_network_policies_select_the_chart_pods(release: str) -> None:
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in find(release_objects(release), "Deployment")
    }
    assert {p["metadata"]["name"] for p in find(release_objects(release), "NetworkPolicy")} == {
        f"{fullname(release)}-{c}" for c in deployments
    }
    for component, deployment in deployments.items():
        policy = policy_for(release, component)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy_for(release, "operator")["spec"]["ingress"] == []


def test_mlflow_admits_the_operator_and_the_configured_pods_on_its_port() -> None:
    operator_labels = pods_labels("mlflow-sqlite", "operator")
    (rule,) = policy_for("mlflow-sqlite", "mlflow")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    operator_peer, trainers = rule["from"]
    assert operator_peer["podSelector"]["matchLabels"].items() <= operator_labels.items()
    assert trainers == {"namespaceSelector": {}, "podSelector": {"matchLabels": {"luffy.dev/component": "trainer"}}}
    (rule,) = policy_for("mlflow-postgres-pvc", "mlflow")["spec"]["ingress"]
    assert rule["from"][1:] == VALID["mlflow-postgres-pvc"]["mlflow"]["networkPolicy"]["from"]


def pods_labels(release: str, component: str) -> Obj:
    deployment = one(release_objects(release), "Deployment", f"{fullname(release)}-{component}")
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_network_policies_can_be_left_out() -> None:
    assert not find(release_objects("customized"), "NetworkPolicy")
