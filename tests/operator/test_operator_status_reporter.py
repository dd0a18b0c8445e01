"""The trainer's LuffyRun progress reporter, against the emulator over HTTP."""

from __future__ import annotations

import logging
import time

import kubernetes
import pytest
import yaml
from luffy_trainer.k8s_status import LuffyRunStatusReporter
from luffyrun_samples import valid_run
from operator_harness import RUNS, Cluster
from servers import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def api_for(kubeconfig: str) -> kubernetes.client.CustomObjectsApi:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))


def test_not_on_a_cluster_means_no_reporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUFFY_RUN_NAME", raising=False)
    assert LuffyRunStatusReporter.from_env() is None


def test_from_env_reports_into_the_named_run(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.api.create(RUNS, valid_run("rep"))
    monkeypatch.setenv("LUFFY_RUN_NAME", "rep")
    monkeypatch.setenv("LUFFY_RUN_NAMESPACE", "default")
    reporter = LuffyRunStatusReporter.from_env()
    assert reporter is not None and (reporter.name, reporter.namespace) == ("rep", "default")
    reporter.report(step=4, total_steps=20, reward=0.75)
    progress = cluster.status("rep")["progress"]
    assert (progress["step"], progress["totalSteps"], progress["reward"]) == (4, 20, 0.75)
    assert progress["updatedTime"].endswith("Z")
    assert cluster.requests("PATCH", "/luffyruns/rep/status") == 1
    assert cluster.requests("PATCH", "/luffyruns/rep") == 1  # the status subresource only
    assert cluster.run("rep")["spec"] == valid_run("rep")["spec"]


def test_reports_are_rate_limited_but_the_last_step_always_goes(cluster: Cluster) -> None:
    cluster.api.create(RUNS, valid_run("rate"))
    clock = FakeClock()
    reporter = LuffyRunStatusReporter("rate", "default", api_for(str(cluster.kubeconfig)), 10.0, clock)
    sent = []
    for now, step in ((0.0, 1), (5.0, 2), (11.0, 3), (12.0, 4), (13.0, 10)):
        clock.now = now
        reporter.report(step, total_steps=10, reward=float("nan") if step == 3 else 0.5)
        sent.append(cluster.status("rate")["progress"]["step"])
    assert sent == [1, 1, 3, 3, 10]
    assert cluster.requests("PATCH", "/luffyruns/rate/status") == 3


def test_errors_are_logged_never_raised(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    missing = LuffyRunStatusReporter("ghost", "default", api_for(str(cluster.kubeconfig)), 0.0)
    with caplog.at_level(logging.WARNING, logger="luffy_trainer.k8s_status"):
        missing.report(1, 10, 0.1)
    assert "default/ghost" in caplog.text and "404" in caplog.text

    dead = cluster.kubeconfig.parent / "dead.yaml"
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"
    dead.write_text(yaml.safe_dump(config))
    unreachable = LuffyRunStatusReporter("rep", "default", api_for(str(dead)), 0.0, timeout_s=2)
    started = time.monotonic()
    unreachable.report(1, 10, 0.1)
    assert time.monotonic() - started < 10
