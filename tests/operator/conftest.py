"""Fixtures of the operator tests: the kmock emulator as a cluster, the real operator, an MLflow server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_harness import Cluster, InProcessOperator, emulated_cluster

# The operator reads its settings once, when KopfRunner first imports luffy_operator.handlers: resync fast in tests.
os.environ.setdefault("LUFFY_OPERATOR_RESYNC_SECONDS", "0.5")
os.environ.setdefault("LUFFY_OPERATOR_MLFLOW_TIMEOUT_SECONDS", "3")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[InProcessOperator]:
    with InProcessOperator(cluster) as op:
        yield op
    assert op.runner.exit_code == 0, op.runner.output
