"""Rollout batches generated ahead of training on a fixed schedule (`rollout.maxStaleness` = k).

Batch s is generated from the weights after step max(0, s-1-k): with k = 0 generation and training take turns, with
k = 1 the next batch is generated while the current one trains. The schedule is fixed, not "whatever is newest", so a
run is reproducible and a resume is exact: a checkpoint at step s holds the batches s+1..s+k already generated from
older weights, and a resumed run trains them rather than regenerating them from newer ones.

One worker thread runs every generation in submission order, which is the order the trainer will consume. The
trainer changes the engine's weights only between generations (`drain` first), so no request ever sees two weight
versions, and it never uses the engine or the reward pool itself while a batch is in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from luffy_trainer.groups import Sample
from luffy_trainer.rollout.base import RolloutError


@dataclass
class RolloutBatch:
    """One step's samples with its batch metrics."""

    step: int
    samples: list[Sample]
    metrics: dict[str, float]

    @property
    def versions(self) -> list[int]:
        """The weight version that generated each on-policy completion."""
        return [s.weight_version for s in self.samples if s.weight_version is not None]


def staleness_metrics(batch: RolloutBatch, max_staleness: int) -> dict[str, float]:
    """Staleness (versions between generation and the weights it trains) of a batch's completions; raises if any
    completion is staler than the bound, the invariant the schedule guarantees."""
    if not batch.versions:
        return {}
    staleness = [batch.step - 1 - v for v in batch.versions]
    if max(staleness) > max_staleness or min(staleness) < 0:
        raise RolloutError(
            f"batch {batch.step} holds completions of weight versions {sorted(set(batch.versions))}: staleness "
            f"{sorted(set(staleness))} outside [0, rollout.maxStaleness = {max_staleness}]"
        )
    return {"async/staleness_mean": sum(staleness) / len(staleness), "async/staleness_max": float(max(staleness))}


class RolloutPipeline:
    """Batches produced by one worker thread in submission order; the trainer takes them by step."""

    def __init__(self, produce: Callable[..., RolloutBatch]) -> None:
        self._produce = produce
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="luffy-rollout-batch")
        self._batches: dict[int, Future[RolloutBatch]] = {}
        self._last_end: float | None = None

    def __contains__(self, step: int) -> bool:
        return step in self._batches

    def submit(self, step: int, *args) -> None:
        """Queue the generation of batch `step` (after every batch submitted before it)."""
        self._batches[step] = self._worker.submit(self._run, step, *args)

    def _run(self, step: int, *args) -> RolloutBatch:
        start = time.perf_counter()
        idle = start - self._last_end if self._last_end is not None else 0.0
        try:
            batch = self._produce(step, *args)
        finally:
            self._last_end = time.perf_counter()
        batch.metrics["time/rollout_wait_weights_s"] = idle
        return batch

    def take(self, step: int) -> tuple[RolloutBatch, float]:
        """Batch `step` and the seconds the caller waited for it."""
        start = time.perf_counter()
        batch = self._batches.pop(step).result()
        return batch, time.perf_counter() - start

    def drain(self) -> None:
        """Wait until no generation is in flight (before the weights change); re-raises a failed generation."""
        for future in self._batches.values():
            future.result()

    def state_dict(self) -> list[RolloutBatch]:
        """The generated batches not yet trained (call after `drain`), for a checkpoint."""
        self.drain()
        return [self._batches[s].result() for s in sorted(self._batches)]

    def load_state_dict(self, batches: list[RolloutBatch]) -> None:
        for batch in batches:
            done: Future[RolloutBatch] = Future()
            done.set_result(batch)
            self._batches[batch.step] = done

    def close(self) -> None:
        """Stop: queued generations are dropped, a running one is waited for (its engine is closed next)."""
        self._worker.shutdown(wait=True, cancel_futures=True)
