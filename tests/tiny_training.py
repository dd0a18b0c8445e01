"""The tiny training runs the tests share: the quickstart task and a config small enough for 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from luffy_trainer.demo.tasks import write_arithmetic_task


def write_task(directory: Path) -> Path:
    """The quickstart task in the released LUFFY parquet schema (prompt / target / reward_model columns)."""
    return write_arithmetic_task(directory, n_base=16, n_train=64, seed=1, val_per_total=2)


def train_config(tiny_model_dir: str, task_dir: Path, work: Path, **sections) -> dict:
    """A `luffy train` config (camelCase, as a user writes it) for the tiny model; `sections` update its sections."""
    config = {
        "model": {"path": tiny_model_dir, "dtype": "float32", "gradientCheckpointing": False},
        "data": {
            "trainFiles": [str(task_dir / "train.parquet")],
            "valFiles": [str(task_dir / "val.parquet")],
            "maxPromptLength": 64,
            "maxResponseLength": 48,
        },
        "algorithm": {"nOnPolicy": 3},
        "reward": {"numWorkers": 1},
        "rollout": {"backend": "vllm", "maxModelLen": 128},
        "optimization": {"lr": 1e-3, "promptsPerStep": 4, "optimizerStepsPerBatch": 2, "totalSteps": 3},
        "validation": {"everySteps": 0, "samplesPerPrompt": 2},
        "checkpoint": {"dir": str(work / "ckpt"), "everySteps": 2, "keepLast": 2},
        "tracking": {"experimentName": "train-tests", "systemMetrics": False},
        "outputDir": str(work / "out"),
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
