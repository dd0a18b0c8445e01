"""Stopping at a step boundary when Kubernetes asks: SIGTERM (an eviction by Kueue, a node drain, a deletion) sets a
flag, and the training loop, between two steps, saves a checkpoint and stops with contract.PREEMPTED_EXIT_CODE. The
pod's terminationGracePeriodSeconds bounds how long that may take before the kubelet's SIGKILL.

The flag is agreed on by every rank (all-reduce) so that all of them take the same checkpoint at the same step: torchrun
forwards the signal to each rank, but not at the same instant.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from luffy_trainer.distributed import World, all_reduce_max

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped at a step boundary on request, its checkpoint saved: not a failure."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on SIGTERM after step {step}, checkpoint saved; resume continues from there")
        self.step = step


class StopRequest:
    """The SIGTERM flag. `watch()` installs the handler (main thread only: elsewhere signals cannot be caught, and
    the request is never set); `restore()` puts the previous handler back."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None

    def watch(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint and stopping after the current step")
        self._event.set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, world: World, device: torch.device) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank)."""
        return bool(all_reduce_max(int(self._event.is_set()), world, device))


def stop_at(step: int, saved: bool, save_checkpoint: Callable[[int], None]) -> None:
    """End training after `step`: its checkpoint, unless one was just saved at this step, then Preempted."""
    if not saved:
        save_checkpoint(step)
    raise Preempted(step)
