"""Step checkpoints: model and optimizer through torch.distributed.checkpoint, the rest in a small state file.

A checkpoint is a directory `step_<N>` holding the DCP shards of the model and optimizer (so it can be restored on
any number of ranks) and `trainer_state.pt` (step, scheduler, sampler position, RNG states, MLflow run id). It is
written under a temporary name and renamed when complete, so a crash mid-save never leaves a half checkpoint that
resume would pick up.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save, find, load and prune step checkpoints in one directory."""

    def __init__(self, directory: str | Path, keep_last: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Write checkpoint `step` (collective: every rank calls it) and prune old ones."""
        final = self.directory / f"step_{step:06d}"
        staging = self.directory / f".step_{step:06d}.partial"
        if _is_main():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(staging))
        if _is_main():
            torch.save({**trainer_state, "step": step}, staging / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            self._prune()
            log.info("saved checkpoint %s", final)
        _barrier()
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place (any number of ranks) and return the trainer state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return torch.load(path / STATE_FILE, weights_only=False)

    def _prune(self) -> None:
        for _, path in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed old checkpoint %s", path)
