"""MLflow tracking against a real `mlflow server` on 127.0.0.1: params, buffered metrics, outages, resume."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import luffy_trainer
import pytest
from luffy_trainer.config import TrackingConfig, UserError
from luffy_trainer.tracking import STEP_MARKER, MlflowTracker, resolve_tracking_uri, source_commit
from mlflow.tracking import MlflowClient
from servers import MlflowServer, free_port


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_params_metrics_and_text_artifact(mlflow_server, tmp_path):
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=mlflow_server.uri, experiment_name="t-basic", system_metrics=False),
        workdir=tmp_path,
    )
    run_id = tracker.start({"algorithm.gamma": "0.1", "optimization.lr": "1e-06"})
    for step in range(1, 4):
        tracker.log_metrics(step, {"reward/mean": step / 10})
    tracker.log_text("a: 1\n", "config/resolved.yaml")
    tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.data.params["algorithm.gamma"] == "0.1"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/resolved.yaml"]


def test_outage_buffers_metrics_and_delivers_them_later(tmp_path):
    server = MlflowServer(tmp_path).start()
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=server.uri, experiment_name="t-outage", system_metrics=False), workdir=tmp_path
    )
    run_id = tracker.start({})
    try:
        for step in (1, 2, 3):
            tracker.log_metrics(step, {"loss/total": float(step)})
        assert tracker.flush(timeout_s=30)
        server.stop()
        started = time.monotonic()
        for step in range(4, 9):
            tracker.log_metrics(step, {"loss/total": float(step)})
        assert time.monotonic() - started < 1.0  # logging never waits for the server
        assert not tracker.flush(timeout_s=3)  # the server is down: nothing can be sent
        assert tracker.pending == 5
        server.start()
        assert tracker.flush(timeout_s=60)
        tracker.finish()
        client = MlflowClient(server.uri)
        assert _steps(client, run_id, "loss/total") == list(range(1, 9))
    finally:
        server.stop()


def test_resumed_tracker_continues_the_run_without_duplicate_steps(mlflow_server, tmp_path, monkeypatch):
    config = TrackingConfig(tracking_uri=mlflow_server.uri, experiment_name="t-resume", system_metrics=False)
    first = MlflowTracker(config, workdir=tmp_path)
    run_id = first.start({"a": "1"})
    for step in range(1, 6):
        first.log_metrics(step, {"reward/mean": 0.0})
    first.finish(status="FAILED")  # e.g. the pod died after step 5; its checkpoint was at step 3

    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    second = MlflowTracker(config, workdir=tmp_path)
    assert second.start({"a": "1"}) == run_id
    assert second.last_logged_step == 5
    for step in range(4, 8):  # steps 4 and 5 are trained again after resuming from step 3
        second.log_metrics(step, {"reward/mean": 1.0})
    second.finish()
    client = MlflowClient(mlflow_server.uri)
    assert _steps(client, run_id, "reward/mean") == [1, 2, 3, 4, 5, 6, 7]
    assert _steps(client, run_id, STEP_MARKER) == [1, 2, 3, 4, 5, 6, 7]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_fails_with_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=uri, system_metrics=False, connect_timeout_s=2), workdir=tmp_path
    )
    with pytest.raises(UserError, match=f"cannot reach the MLflow tracking server at {uri}"):
        tracker.start({})


def test_unknown_run_id_is_refused_not_retried(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    tracker = MlflowTracker(TrackingConfig(tracking_uri=mlflow_server.uri, system_metrics=False), workdir=tmp_path)
    with pytest.raises(RuntimeError, match="refused to open the MLflow run"):
        tracker.start({})


def test_environment_overrides_config(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://a:5000"), tmp_path) == "http://a:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://b:5000")
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://a:5000"), tmp_path) == "http://b:5000"


def test_metric_names_with_at_sign_are_logged_and_rejected_batches_do_not_block(mlflow_server, tmp_path):
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=mlflow_server.uri, experiment_name="t-names", system_metrics=False),
        workdir=tmp_path,
    )
    run_id = tracker.start({})
    tracker.log_metrics(1, {"val/math/avg@4": 0.5})
    tracker.log_metrics(2, {"bad name!": 1.0})  # MLflow refuses '!': this step is dropped with an error
    tracker.log_metrics(3, {"val/math/avg@4": 0.75})
    assert tracker.flush(timeout_s=30)
    tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/math/avg_at_4")) == [
        (1, 0.5),
        (3, 0.75),
    ]


def test_data_files_are_dataset_inputs_and_the_code_version_source_tags(mlflow_server, tmp_path):
    train, val = tmp_path / "train.parquet", tmp_path / "val.jsonl"
    train.write_bytes(b"training rows")
    val.write_bytes(b"validation rows")
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=mlflow_server.uri, experiment_name="t-lineage", system_metrics=False),
        workdir=tmp_path,
    )
    run_id = tracker.start({})
    for _ in range(2):  # as a restarted trainer logs them again
        tracker.log_datasets({"training": [str(train)], "validation": [str(val)]})
    tracker.log_code_version("luffy train")
    tracker.finish()

    run = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert len(run.inputs.dataset_inputs) == 2
    inputs = {
        d.dataset.name: (
            d.dataset.digest,
            json.loads(d.dataset.source),
            d.dataset.source_type,
            {t.key: t.value for t in d.tags},
        )
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        path.name: (
            hashlib.sha256(path.read_bytes()).hexdigest()[:12],
            {"uri": str(path)},
            "local",
            {"mlflow.data.context": context},
        )
        for path, context in ((train, "training"), (val, "validation"))
    }
    tags = run.data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("luffy train", "LOCAL")
    assert tags["luffy.version"] == luffy_trainer.__version__
    package = Path(luffy_trainer.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout, as in development and CI
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    else:
        assert "mlflow.source.git.commit" not in tags


def test_no_commit_is_claimed_outside_a_git_checkout(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "luffy_trainer"
    package.mkdir(parents=True)
    monkeypatch.setattr(luffy_trainer, "__file__", str(package / "__init__.py"))
    assert source_commit() is None


def test_nested_runs_show_under_their_parent(mlflow_server, tmp_path):
    def tracker(name: str) -> MlflowTracker:
        config = TrackingConfig(tracking_uri=mlflow_server.uri, experiment_name="t-nest", run_name=name)
        return MlflowTracker(config.model_copy(update={"system_metrics": False}), workdir=tmp_path)

    children = []
    for name in ("child-a", "child-b"):
        child = tracker(name)
        children.append(child.start({}))
        child.finish()
    parent = tracker("parent")
    parent_id = parent.start({})
    parent.nest(children)
    parent.finish()

    client = MlflowClient(mlflow_server.uri)
    assert [client.get_run(c).data.tags.get("mlflow.parentRunId") for c in children] == [parent_id, parent_id]
    assert "mlflow.parentRunId" not in client.get_run(parent_id).data.tags
