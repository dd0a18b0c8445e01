"""Fixtures of the operator tests: the kmock emulator as a cluster, the real operator, an MLflow server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import kubernetes.config.kube_config
import pytest
import yaml
from kmock_shim import EmulatorServer
from operator_harness import CRD_PATH, Cluster, HttpApi, InProcessOperator

# The operator reads its settings once, when KopfRunner first imports luffy_operator.handlers: resync fast in tests.
os.environ.setdefault("LUFFY_OPERATOR_RESYNC_SECONDS", "0.5")
os.environ.setdefault("LUFFY_OPERATOR_MLFLOW_TIMEOUT_SECONDS", "3")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with EmulatorServer() as server:
        api = HttpApi(server.url)
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD_PATH.read_text()))
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(server.kubeconfig()))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield Cluster(server, kubeconfig)


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[InProcessOperator]:
    with InProcessOperator(cluster) as op:
        yield op
    assert op.runner.exit_code == 0, op.runner.output
