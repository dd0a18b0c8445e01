"""Asynchronous rollouts on disaggregated hardware: `rollout.maxStaleness` 0 against 1, in one interleaved run.

Each role owns its hardware, as the pods of a LuffyRun own their GPUs: one `luffy serve-rollout` replica is pinned to
CPU 0 (its vLLM threads bound there) and the trainer (`luffy train`, backend `vllm-server`, one torch thread) to CPU 1.
Blocks k0, k1, k0, k1, ... each start a fresh server and a fresh trainer from the same model and data, train
`--steps` steps of LUFFY on the quickstart task (tiny Qwen2, `--shape`), and are read back from the run's MLflow
store. After `--warmup` steps, the medians per block of:

- step time (`time/step_s`) and steps per second;
- trainer idle: the share of the step spent waiting for its batch (`time/wait_rollout_s`);
- rollout idle: the share of the step the rollout side stood waiting for weights (`time/rollout_wait_weights_s`,
  the gap between the end of one generation and the start of the next, seen from the trainer's rollout client).

    .venv/bin/python -P benchmarks/async_rollouts.py
    .venv/bin/python -P benchmarks/async_rollouts.py --blocks 4 --steps 12 --max-tokens 96

Needs two CPUs that nothing else uses much; on a shared machine the ratio is what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "h128x2": {},
    "h256x2": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                   num_hidden_layers=2),
    "h256x4": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                   num_hidden_layers=4),
}  # fmt: skip
ROLLOUT_CPU, TRAINER_CPU = 0, 1


@contextlib.contextmanager
def pinned(cpu: int):
    """Processes started inside inherit affinity to `cpu` only (this process gets its own mask back after)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def train_config(model: Path, task: Path, work: Path, args: argparse.Namespace, url: str, port: int) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32", "gradientCheckpointing": False},
        "data": {
            "trainFiles": [str(task / "train.parquet")],
            "maxPromptLength": 64,
            "maxResponseLength": max(64, args.max_tokens),  # the task's traces are up to ~50 tokens
        },
        "algorithm": {"mode": "luffy", "nOnPolicy": 7, "nOffPolicy": 1},
        "reward": {"numWorkers": 1},
        "rollout": {
            "backend": "vllm-server",
            "serverUrls": [url],
            "weightSyncPort": port,
            "maxTokens": args.max_tokens,
            "maxStaleness": 0,
        },
        "optimization": {
            "lr": 1e-4,
            "promptsPerStep": args.prompts,
            "optimizerStepsPerBatch": 1,
            "totalSteps": args.steps,
        },
        "validation": {"everySteps": 0},
        "checkpoint": {"dir": str(work / "ckpt"), "everySteps": 1_000_000, "resume": "never"},
        "tracking": {
            "trackingUri": f"sqlite:///{work}/mlflow.db",
            "experimentName": "async-benchmark",
            "logModel": False,
            "systemMetrics": False,
        },
        "outputDir": str(work / "out"),
    }


def run_block(k: int, index: int, model: Path, task: Path, root: Path, args: argparse.Namespace) -> dict:
    from luffy_trainer.rollout.serve import LocalRolloutServer
    from mlflow.tracking import MlflowClient
    from servers import free_port

    work = root / f"block{index}-k{k}"
    work.mkdir()
    server_env = {"VLLM_CPU_OMP_THREADS_BIND": str(ROLLOUT_CPU), "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = LocalRolloutServer(
        str(model), free_port(), log_path=work / "server.log", max_model_len=512, env=server_env
    )
    config = train_config(model, task, work, args, server.url, free_port())
    config["rollout"]["maxStaleness"] = k
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    with pinned(ROLLOUT_CPU):
        server.start()
    try:
        server.wait_healthy()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        with pinned(TRAINER_CPU):
            proc = subprocess.run(
                [sys.executable, "-m", "luffy_trainer.cli", "train", str(work / "run.yaml")],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            raise SystemExit(f"block {index} (k={k}) failed:\n{proc.stderr[-3000:]}")
    finally:
        server.stop()
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("async-benchmark").experiment_id])

    def series(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    step, wait, idle = series("time/step_s"), series("time/wait_rollout_s"), series("time/rollout_wait_weights_s")
    gen, train, sync = series("time/generate_s"), series("time/train_s"), series("time/weight_sync_s")
    steps = [s for s in sorted(step) if s > args.warmup]

    def median(values: dict[int, float], per_step: bool = False) -> float:
        return statistics.median(values[s] / step[s] if per_step else values[s] for s in steps)

    return {
        "k": k,
        "step_s": median(step),
        "trainer_idle": median(wait, per_step=True),
        "rollout_idle": median(idle, per_step=True),
        "generate_s": median(gen),
        "train_s": median(train),
        "sync_s": median(sync),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks, alternating k=0 and k=1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="h256x2")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (the rollout server on CPU 0, the trainer on CPU 1)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from luffy_trainer.demo.tasks import write_arithmetic_task
    from luffy_trainer.demo.tiny import TinyModelShape, make_tiny_model

    with tempfile.TemporaryDirectory(prefix="luffy-async-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", shape=TinyModelShape(**SHAPES[args.shape]))
        task = write_arithmetic_task(root / "task", n_base=16, n_train=256, seed=1, val_per_total=1)
        rows = [run_block(i % 2, i, model, task, root, args) for i in range(args.blocks)]
    print(f"shape {args.shape}, {args.prompts} prompts x (7 rollouts + 1 trace), up to {args.max_tokens} tokens, "
          f"{args.steps} steps per block, medians after {args.warmup} warm-up steps\n")  # fmt: skip
    print(
        "| block | k | step (s) | steps/s | generate (s) | train (s) | weight sync (s) | trainer idle | rollout idle |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(
            f"| {i} | {r['k']} | {r['step_s']:.2f} | {1 / r['step_s']:.3f} | {r['generate_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['sync_s']:.2f} | {r['trainer_idle']:.0%} | {r['rollout_idle']:.0%} |"
        )
    sync_steps = statistics.median(r["step_s"] for r in rows if r["k"] == 0)
    async_steps = statistics.median(r["step_s"] for r in rows if r["k"] == 1)
    print(f"\nk=1 runs {sync_steps / async_steps:.2f}x the steps per second of k=0 (median step {async_steps:.2f} s "
          f"against {sync_steps:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
