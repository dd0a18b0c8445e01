"""The trainer's progress reporter, against the emulator over HTTP: it writes its run's progress ConfigMap, the one
object its Role may patch, and never the LuffyRun."""

from __future__ import annotations

import json
import logging
import time

import kubernetes
import pytest
import yaml
from luffy_operator import manifests
from luffy_operator.manifests import RunRef
from luffy_trainer import contract
from luffy_trainer.k8s_status import ProgressReporter
from luffyrun_samples import valid_run
from operator_harness import CONFIGMAPS, RUNS, Cluster
from servers import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def api_for(kubeconfig: str) -> kubernetes.client.CoreV1Api:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))


def create_run(cluster: Cluster, name: str) -> None:
    """The run and the progress ConfigMap the operator would create for it."""
    uid = cluster.api.create(RUNS, valid_run(name))["metadata"]["uid"]
    cluster.api.create(CONFIGMAPS, manifests.progress_config_map(RunRef(name, "default", uid)))


def report_of(cluster: Cluster, name: str) -> dict:
    data = cluster.api.get(f"{CONFIGMAPS}/{contract.progress_config_map(name)}")["data"]
    return json.loads(data[contract.PROGRESS_KEY])


def test_not_on_a_cluster_means_no_reporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUFFY_RUN_NAME", raising=False)
    assert ProgressReporter.from_env() is None


def test_from_env_reports_into_the_runs_progress_config_map(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    create_run(cluster, "rep")
    monkeypatch.setenv("LUFFY_RUN_NAME", "rep")
    monkeypatch.setenv("LUFFY_RUN_NAMESPACE", "default")
    monkeypatch.setenv("LUFFY_ATTEMPT", "2")
    reporter = ProgressReporter.from_env()
    assert reporter is not None and (reporter.name, reporter.namespace, reporter.attempt) == ("rep", "default", 2)
    reporter.report(step=4, total_steps=20, reward=0.75)
    report = contract.ProgressReport.model_validate(report_of(cluster, "rep"))
    assert (report.step, report.total_steps, report.reward, report.attempt) == (4, 20, 0.75, 2)
    assert report.updated_time.endswith("Z")
    assert cluster.requests("PATCH", "/configmaps/rep-progress") == 1
    assert cluster.requests("PATCH", "/luffyruns/") == 0  # the LuffyRun is not the trainer's to write
    assert cluster.status("rep") == {}


def test_reports_are_rate_limited_but_the_last_step_always_goes(cluster: Cluster) -> None:
    create_run(cluster, "rate")
    clock = FakeClock()
    reporter = ProgressReporter("rate", "default", api_for(str(cluster.kubeconfig)), 10.0, clock)
    sent = []
    for now, step in ((0.0, 1), (5.0, 2), (11.0, 3), (12.0, 4), (13.0, 10)):
        clock.now = now
        reporter.report(step, total_steps=10, reward=float("nan") if step == 3 else 0.5)
        sent.append(report_of(cluster, "rate")["step"])
    assert sent == [1, 1, 3, 3, 10]
    assert cluster.requests("PATCH", "/configmaps/rate-progress") == 3


def test_errors_are_logged_never_raised(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    missing = ProgressReporter("ghost", "default", api_for(str(cluster.kubeconfig)), 0.0)
    with caplog.at_level(logging.WARNING, logger="luffy_trainer.k8s_status"):
        missing.report(1, 10, 0.1)
    assert "default/ghost" in caplog.text and "404" in caplog.text

    dead = cluster.kubeconfig.parent / "dead.yaml"
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"
    dead.write_text(yaml.safe_dump(config))
    unreachable = ProgressReporter("rep", "default", api_for(str(dead)), 0.0, timeout_s=2)
    started = time.monotonic()
    unreachable.report(1, 10, 0.1)
    assert time.monotonic() - started < 10
