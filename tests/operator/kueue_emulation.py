"""Kueue's part in the operator and chart tests: its CRDs as the emulator serves them (names, versions and scopes, not
Kueue's schemas), ResourceFlavors, and the Workload statuses Kueue writes."""

from __future__ import annotations

from typing import Any

from luffy_operator import kueue

NOW = "2026-12-02T04:00:00Z"
WORKLOADS = "/apis/kueue.x-k8s.io/v1beta2/namespaces/default/workloads"
FLAVORS = "/apis/kueue.x-k8s.io/v1beta2/resourceflavors"
PRIORITY_CLASSES = "/apis/scheduling.k8s.io/v1/priorityclasses"
GPU_TAINT = {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}


def crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kueue.x-k8s.io"},
        "spec": {
            "group": "kueue.x-k8s.io",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "scope": scope,
            "versions": [
                {
                    "name": "v1beta2",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def flavor(name: str, node_labels: dict[str, str], tolerations: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"nodeLabels": node_labels, "tolerations": tolerations}
    return {"apiVersion": kueue.API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def cond(type_: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    value = "True" if status else "False"
    return {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": NOW}


def admitted_status(rollout_flavor: str, trainer_flavor: str) -> dict[str, Any]:
    """What Kueue writes on admission: both pod sets assigned, QuotaReserved and Admitted true."""
    return {
        "admission": {
            "clusterQueue": "gpus",
            "podSetAssignments": [
                {"name": "rollout", "count": 2, "flavors": {"cpu": rollout_flavor, "memory": rollout_flavor}},
                {"name": "trainer", "count": 1, "flavors": {"cpu": trainer_flavor}},
            ],
        },
        "conditions": [
            cond("QuotaReserved", True, "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
            cond("Admitted", True, "Admitted", "The workload is admitted"),
        ],
    }
