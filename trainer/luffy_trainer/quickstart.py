"""`luffy quickstart` (what `make run` runs): LUFFY on a tiny model and a generated addition task, on CPU.

It builds the model and the data once under the work directory, trains each requested mode from scratch with the
same step budget, and prints held-out accuracy side by side. Every run is tracked in the local MLflow store.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from luffy_trainer.config import load_config
from luffy_trainer.tasks import write_arithmetic_task
from luffy_trainer.tiny import TinyModelShape, make_tiny_model

log = logging.getLogger(__name__)

QUICKSTART_MODEL = TinyModelShape()
# Baselines as the released LUFFY scripts run them: on-policy GRPO with 8 samples and PPO clip 0.2; SFT on traces.
MODE_OVERRIDES: dict[str, list[str]] = {
    "luffy": [],
    "grpo": ["algorithm.n_on_policy=8", "algorithm.clip_eps=0.2"],
    "sft": ["algorithm.n_on_policy=0"],
    "rl_sft_loss": [],
}


def prepare(workdir: Path) -> tuple[Path, Path]:
    """Build the tiny model and the task data unless they exist; returns (model dir, data dir)."""
    model_dir, data_dir = workdir / "model", workdir / "data"
    if not (model_dir / "config.json").is_file():
        log.info("building the tiny model in %s", model_dir)
        make_tiny_model(model_dir, seed=0, shape=QUICKSTART_MODEL)
    if not (data_dir / "train.parquet").is_file():
        log.info("writing the arithmetic task to %s", data_dir)
        write_arithmetic_task(data_dir)
    return model_dir, data_dir


def run_mode(config_path: str, workdir: Path, mode: str, extra: list[str]):
    from luffy_trainer.train import LuffyTrainer

    model_dir, data_dir = prepare(workdir)
    checkpoints, outputs = workdir / "checkpoints" / mode, workdir / "outputs" / mode
    shutil.rmtree(checkpoints, ignore_errors=True)  # each quickstart run starts from the untrained model
    overrides = [
        f"model.path={model_dir}",
        f"data.train_files=[{data_dir / 'train.parquet'}]",
        f"data.val_files=[{data_dir / 'val.parquet'}]",
        f"algorithm.mode={mode}",
        f"checkpoint.dir={checkpoints}",
        f"output_dir={outputs}",
        f"tracking.run_name=quickstart-{mode}",
        *MODE_OVERRIDES[mode],
        *extra,
    ]
    return LuffyTrainer(load_config(config_path, overrides)).run()


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    results = {}
    for mode in args.modes:
        log.info("quickstart: training mode %s", mode)
        results[mode] = run_mode(args.config, workdir, mode, args.overrides)
    print("\nheld-out accuracy (avg@k over sampled answers; pass@k: any of k correct)")
    for mode, result in results.items():
        if result.validation is None:
            continue
        scores = ", ".join(
            f"{source}: {s[f'avg@{result.validation.k}']:.3f}" for source, s in result.validation.by_source.items()
        )
        print(f"  {mode:12s} {scores}  (MLflow run {result.run_id})")
    print(
        "\nSee the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"
    )
    return 0
