"""The rollout engine protocol shared by every backend.

The trainer only sees this interface: token ids in, token ids + per-token log-probs out, and a way to push new
weights. Which weights produced a completion is recorded on it, so stale samples can be detected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from luffy_trainer.config import UserError

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one generate call (-1 top_k disables it; temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the engine's weights
    finish_reason: FinishReason
    weight_version: int


class RolloutError(RuntimeError):
    """A rollout engine could not answer (no healthy server, a failed weight update...)."""


class RolloutUnreachable(RolloutError, UserError):
    """No rollout server ever answered: a wrong URL or servers not started, which the user fixes (unlike servers
    that answered once and went down)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generation backend."""

    @property
    def weight_version(self) -> int:
        """The version of the weights the engine currently serves (0 = as loaded from the model directory)."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order; each prompt is answered exactly once.

        With a `seed`, prompt i samples from a seed derived from (seed, i), so a batch is reproducible whichever
        replica answers each prompt. Greedy decoding (temperature 0) returns the one greedy completion `n` times.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (Hugging Face parameter names) into every engine replica; later generations use them."""
        ...

    def health(self) -> bool:
        """Whether the engine can serve now."""
        ...

    def close(self) -> None:
        """Release processes, sockets and memory."""
        ...
