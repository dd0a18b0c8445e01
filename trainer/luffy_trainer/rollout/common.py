"""Request checks and sampling conventions shared by every rollout backend."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from luffy_trainer.rollout.base import Completion, FinishReason, RolloutError, SamplingParams

T = TypeVar("T")


def check_request(prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> None:
    """Reject a malformed generate call with a message that names the offending argument."""
    if n < 1:
        raise RolloutError(f"n must be at least 1, got {n}")
    if params.max_tokens < 1:
        raise RolloutError(f"SamplingParams.max_tokens must be at least 1, got {params.max_tokens}")
    if params.temperature < 0:
        raise RolloutError(f"SamplingParams.temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise RolloutError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k == 0 or params.top_k < -1:
        raise RolloutError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {params.top_k}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise RolloutError(f"prompt {i} is empty")


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0


def samples_per_request(params: SamplingParams, n: int) -> int:
    """Greedy decoding has one answer (vLLM refuses n > 1 with it): sample once, then repeat it `n` times."""
    return 1 if is_greedy(params) else n


def repeat_greedy(completions: list[Completion], params: SamplingParams, n: int) -> list[Completion]:
    return completions * n if is_greedy(params) else completions


def prompt_seed(seed: int | None, index: int) -> int | None:
    """The seed of prompt `index` in a batch seeded with `seed`, the same whichever engine or replica answers it.

    A hash, not `seed + index`: vLLM seeds the k-th of n samples with `seed + k`, so consecutive seeds would give
    prompt i+1 the random stream of prompt i's second sample. 62 bits keep `seed + k` inside vLLM's int64 range.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def finish_reason(reason: str | None) -> FinishReason:
    return reason if reason in ("stop", "length") else "abort"


def check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RolloutError(f"weight version must be a non-negative int, got {version!r}")


def nonempty(items: Iterable[T], what: str) -> Iterator[T]:
    """`items` as an iterator, after checking (by reading one item) that there is at least one."""
    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        raise RolloutError(f"{what} is empty")
    return itertools.chain([first], iterator)
