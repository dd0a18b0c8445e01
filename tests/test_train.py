"""`luffy train` end to end on the tiny model with real vLLM and a real MLflow server on 127.0.0.1.

Covers: params, step metrics and the logged model; SIGKILL after a checkpoint then restart (same MLflow run, next
step, no duplicated steps); SIGTERM mid-run (a checkpoint of the step it stopped at, then resume); a tracking server
that is down for part of a run (no metric lost); each algorithm mode.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from docs_metrics import compare
from luffy_trainer import contract, preemption
from luffy_trainer.checkpoint import CheckpointManager
from luffy_trainer.config import parse_config
from luffy_trainer.tracking import STEP_MARKER
from luffy_trainer.train import LuffyTrainer
from mlflow.tracking import MlflowClient
from servers import MlflowServer, train_process, trainer_env, wait_for
from tiny_training import write_task

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The quickstart task in the released LUFFY parquet schema (prompt / target / reward_model columns)."""
    return write_task(tmp_path_factory.mktemp("task"))


def _history_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_short_run_logs_params_metrics_and_model(short_training_run):
    result, work = short_training_run.result, short_training_run.workdir
    assert result.final_step == 3
    assert (result.model_dir / "model.safetensors").is_file()
    assert result.validation is not None and set(result.validation.by_source) == {"unseen-5-terms", "4-terms"}

    client = MlflowClient(short_training_run.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.gamma"] == "0.1"
    assert run.data.params["optimization.total_steps"] == "3"
    for key in (
        "reward/mean",
        "reward/on_policy",
        "reward/off_policy",
        "batch/solve_all",
        "batch/solve_none",
        "loss/policy",
        "loss/on_policy",
        "loss/off_policy",
        "actor/entropy",
        "actor/off_policy_prob_mean",
        "actor/clip_fraction",
        "actor/grad_norm",
        "actor/lr",
        "response_length/on_policy_mean",
        "time/generate_s",
        "time/train_s",
        "time/weight_sync_s",
        "throughput/rollout_tokens_per_s",
    ):
        assert _history_steps(client, result.run_id, key) == [1, 2, 3], key
    assert _history_steps(client, result.run_id, "val/mean/avg_at_2") == [2, 3]
    # The trace is always correct, so the off-policy reward is 1 and part of each group.
    assert run.data.metrics["reward/off_policy"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config" in artifacts
    inputs = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {("train.parquet", "training"), ("val.parquet", "validation")}
    assert run.data.tags["mlflow.source.name"] == "luffy train"
    version = client.get_model_version_by_alias("tiny-luffy", "candidate")
    assert result.model_version == version.version
    assert version.run_id == result.run_id
    # The best validation score so far (ties keep the earlier step) has its own registered version and alias.
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "val/mean/avg_at_2")}
    best_step = 2 if history[2] >= history[3] else 3
    assert run.data.tags["luffy.best_step"] == str(best_step)
    assert run.data.metrics["val/best/mean_avg"] == max(history.values())
    best = client.get_model_version_by_alias("tiny-luffy", "best")
    assert best.version == result.best_model_version != result.model_version
    # Each version says which logged model it is, so the operator reports the final one, not the best.
    assert (version.tags["luffy.artifact"], best.tags["luffy.artifact"]) == ("model", "best_model")
    assert (work / "out" / "best" / "model.safetensors").is_file()


def test_sigkill_after_checkpoint_then_restart_continues_the_same_run(
    tiny_run_config, task_dir, tmp_path, mlflow_server
):
    config = tiny_run_config(
        task_dir,
        optimization={"totalSteps": 12},
        checkpoint={"everySteps": 4},
        tracking={"trackingUri": mlflow_server.uri, "logModel": False},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    first = train_process(path, trainer_env())
    wait_for(tmp_path / "ckpt" / "step_000004" / "trainer_state.pt", first, timeout_s=300)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    second = train_process(path, trainer_env())
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output[-4000:]
    assert "resumed from" in output and "step_000004" in output

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("train-tests").experiment_id],
        filter_string=f"params.`checkpoint.dir` = '{tmp_path / 'ckpt'}'",
    )
    assert len(runs) == 1  # the restart attached to the run of the killed process
    run_id = runs[0].info.run_id
    assert _history_steps(client, run_id, STEP_MARKER) == list(range(1, 13))
    assert _history_steps(client, run_id, "reward/mean") == list(range(1, 13))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sigterm_checkpoints_the_step_it_stopped_at_and_a_resumed_run_continues_from_it(
    tiny_run_config, task_dir, tmp_path, mlflow_server
):
    """What a trainer pod does when Kueue evicts it (or a node drains): SIGTERM to the training process, as torchrun
    forwards it; the trainer finishes its step, checkpoints it, exits PREEMPTED_EXIT_CODE and leaves its MLflow run
    KILLED, not FAILED; the next attempt resumes from that checkpoint."""
    config = tiny_run_config(
        task_dir,
        optimization={"totalSteps": 10},
        checkpoint={"everySteps": 3},
        tracking={"trackingUri": mlflow_server.uri, "logModel": False},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    ckpt = tmp_path / "ckpt"

    first = train_process(path, trainer_env())
    wait_for(ckpt / "step_000003" / "trainer_state.pt", first, timeout_s=300)
    os.kill(first.pid, signal.SIGTERM)
    output = first.communicate(timeout=300)[0].decode()
    assert first.returncode == contract.PREEMPTED_EXIT_CODE, output[-4000:]
    stopped = int(re.search(r"stopped on SIGTERM after step (\d+)", output).group(1))
    assert 3 <= stopped < 10
    assert CheckpointManager(ckpt, keep_last=100).latest() == ckpt / f"step_{stopped:06d}"
    assert (ckpt / f"step_{stopped:06d}" / "trainer_state.pt").is_file()

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("train-tests").experiment_id],
        filter_string=f"params.`checkpoint.dir` = '{ckpt}'",
    )
    assert run.info.status == "KILLED"
    assert _history_steps(client, run.info.run_id, STEP_MARKER) == list(range(1, stopped + 1))

    second = train_process(path, trainer_env())
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output[-4000:]
    assert f"resumed from {ckpt / f'step_{stopped:06d}'}" in output
    assert _history_steps(client, run.info.run_id, STEP_MARKER) == list(range(1, 11))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_stop_saves_the_step_unless_it_was_just_saved() -> None:
    saved: list[int] = []
    with pytest.raises(preemption.Preempted, match="after step 4"):
        preemption.stop_at(4, False, saved.append)
    with pytest.raises(preemption.Preempted):
        preemption.stop_at(6, True, saved.append)
    assert saved == [4]


def test_tracking_server_down_during_part_of_a_run_loses_no_metrics(tiny_run_config, task_dir, tmp_path):
    (tmp_path / "mlflow-root").mkdir()
    server = MlflowServer(tmp_path / "mlflow-root").start()
    try:
        config = tiny_run_config(
            task_dir,
            optimization={"totalSteps": 16},
            checkpoint={"everySteps": 2},
            tracking={"logModel": False},
        )
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = train_process(path, trainer_env(MLFLOW_TRACKING_URI=server.uri))
        wait_for(tmp_path / "ckpt" / "step_000002" / "trainer_state.pt", proc, timeout_s=300)
        server.stop()
        wait_for(tmp_path / "ckpt" / "step_000008" / "trainer_state.pt", proc, timeout_s=300)
        server.start()
        output = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, output[-4000:]
        assert "buffering metrics" in output, output[-6000:]
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("train-tests").experiment_id])
        assert _history_steps(client, run.info.run_id, STEP_MARKER) == list(range(1, 17))
        assert _history_steps(client, run.info.run_id, "loss/total") == list(range(1, 17))
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("mode", "algorithm"),
    [("grpo", {"nOffPolicy": 0, "clipEps": 0.2}), ("sft", {"nOnPolicy": 0}), ("rl_sft_loss", {})],
)
def test_baseline_modes_train(mode, algorithm, tiny_run_config, task_dir, tmp_path):
    config = parse_config(
        tiny_run_config(
            task_dir,
            algorithm={"mode": mode, **algorithm},
            optimization={"totalSteps": 2},
            validation={"samplesPerPrompt": 1},
            tracking={"trackingUri": f"sqlite:///{tmp_path}/m.db", "logModel": False},
        )
    )
    result = LuffyTrainer(config, workdir=tmp_path).run()
    m = result.last_metrics
    assert result.final_step == 2
    if mode == "grpo":
        assert "reward/off_policy" not in m and m["loss/off_policy"] == 0.0
    if mode == "sft":
        assert "reward/on_policy" not in m and m["time/generate_s"] == 0.0 and m["loss/nll"] > 0
    if mode == "rl_sft_loss":
        assert m["loss/nll"] > 0 and m["loss/off_policy"] == 0.0 and "reward/on_policy" in m
    # Every metric this mode logs is in the one documented list, and every metric listed for the mode is logged.
    logged = MlflowClient(config.tracking.tracking_uri).get_run(result.run_id).data.metrics
    difference = compare(mode, logged, result.validation.by_source, config.validation.samples_per_prompt)
    assert difference is None, difference
