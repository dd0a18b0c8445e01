"""`luffy quickstart` (what `make run` runs): LUFFY on a tiny model and a generated addition task, on CPU.

Stage 1 (once, cached under the work directory): build the tiny model and the task, then a short supervised warm-up
on one-step sums gives a "base model" that knows the answer format and the addition facts but not how to chain them.
Stage 2: train each requested mode from that base model with the same step budget and print held-out accuracy side
by side. Every run is tracked in the local MLflow store.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from importlib.resources import files
from pathlib import Path

from luffy_trainer.config import load_config
from luffy_trainer.tasks import write_arithmetic_task
from luffy_trainer.tiny import TinyModelShape, make_tiny_model

log = logging.getLogger(__name__)

QUICKSTART_MODEL = TinyModelShape()
# Stage 1's config ships with the package, so a cluster job can prepare the quickstart from the image alone.
BASE_CONFIG = files("luffy_trainer") / "quickstart_base.yaml"
# Baselines as the released LUFFY scripts run them: on-policy GRPO with 8 samples and PPO clip 0.2; SFT on traces.
MODE_OVERRIDES: dict[str, list[str]] = {
    "luffy": [],
    "grpo": ["algorithm.n_on_policy=8", "algorithm.clip_eps=0.2"],
    "sft": ["algorithm.n_on_policy=0"],
    "rl_sft_loss": [],
}


def _paths(workdir: Path) -> dict[str, Path]:
    return {
        "model": workdir / "model",
        "data": workdir / "data",
        "base": workdir / "base",
        "base_model": workdir / "base" / "final",
    }


def prepare(workdir: Path, base_config: str | None = None, extra: list[str] | None = None) -> Path:
    """Build the tiny model, the task data and (stage 1) the base model unless they exist; returns the base model."""
    from luffy_trainer.train import LuffyTrainer

    paths = _paths(workdir)
    if not (paths["model"] / "config.json").is_file():
        log.info("building the tiny model in %s", paths["model"])
        make_tiny_model(paths["model"], seed=0, shape=QUICKSTART_MODEL)
    if not (paths["data"] / "train.parquet").is_file():
        log.info("writing the arithmetic task to %s", paths["data"])
        write_arithmetic_task(paths["data"])
    if not (paths["base_model"] / "config.json").is_file():
        log.info("stage 1: supervised warm-up of the base model (one-step sums)")
        overrides = [
            f"model.path={paths['model']}",
            f"data.train_files=[{paths['data'] / 'base.parquet'}]",
            f"checkpoint.dir={workdir / 'checkpoints' / 'base'}",
            f"output_dir={paths['base']}",
            *(extra or []),
        ]
        LuffyTrainer(load_config(base_config or str(BASE_CONFIG), overrides)).run()
    return paths["base_model"]


def run_mode(config_path: str, workdir: Path, mode: str, extra: list[str]):
    """Stage 2: train `mode` from the base model with the same step budget as every other mode."""
    from luffy_trainer.train import LuffyTrainer

    paths = _paths(workdir)
    checkpoints, outputs = workdir / "checkpoints" / mode, workdir / "outputs" / mode
    shutil.rmtree(checkpoints, ignore_errors=True)  # each quickstart run starts again from the base model
    overrides = [
        f"model.path={paths['base_model']}",
        f"data.train_files=[{paths['data'] / 'train.parquet'}]",
        f"data.val_files=[{paths['data'] / 'val.parquet'}]",
        f"algorithm.mode={mode}",
        f"checkpoint.dir={checkpoints}",
        f"output_dir={outputs}",
        f"tracking.run_name=quickstart-{mode}",
        *MODE_OVERRIDES[mode],
        *extra,
    ]
    return LuffyTrainer(load_config(config_path, overrides)).run()


def comparison_table(results: dict) -> str:
    """Held-out avg@k of every mode at every validated step, as a Markdown table."""
    rows = [(mode, step, val) for mode, r in results.items() for step, val in sorted(r.validation_history.items())]
    if not rows:
        return "no validation results"
    k = rows[0][2].k
    sources = sorted({source for _, _, val in rows for source in val.by_source})
    lines = [
        f"\nheld-out accuracy, avg@{k} (sampled at the validation temperature)\n",
        "| mode | step | " + " | ".join(sources) + " | mean |",
        "|---|---:|" + "---:|" * (len(sources) + 1),
    ]
    for mode, step, val in rows:
        scores = [val.by_source[s][f"avg@{k}"] if s in val.by_source else float("nan") for s in sources]
        lines.append(
            f"| {mode} | {step} | " + " | ".join(f"{x:.3f}" for x in scores) + f" | {val.mean[f'avg@{k}']:.3f} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    base_model = prepare(workdir, args.base_config, args.overrides_base)
    if args.prepare_only:
        print(f"base model ready: {base_model}")
        return 0
    results = {}
    for mode in args.modes:
        log.info("quickstart: training mode %s", mode)
        results[mode] = run_mode(args.config, workdir, mode, args.overrides)
    print(comparison_table(results))
    print(
        "\nSee the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"
    )
    return 0
