"""Rewards: the LUFFY math reward, a registry of named rewards, and a worker pool that grades with a time bound.

A reward is a plain function `(response, ground_truth) -> float` registered under a name with `@register_reward`;
`TrainConfig.reward.name` picks one. The `RewardPool` grades in separate processes because a grader can stall on a
pathological answer (symbolic algebra on huge expressions): a sample over `timeout_s` scores 0 and its worker is
killed and replaced, so one bad completion never hangs a training step.

Evaluation mixes math and multiple-choice benchmarks (ARC-c, GPQA, MMLU-Pro), so a pool can grade each sample with
its own reward: `select_reward` picks one from the sample's data source and answer, and `RewardPool.score` takes the
per-sample names.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from luffy_trainer.config import UserError

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}

THINK_CLOSE = "</think>"
# math_verify's own per-parse / per-comparison bound (its default); it relies on SIGALRM, main thread only.
MATH_VERIFY_TIMEOUT_S = 5
# How long a freshly started grading process may take to import its reward before the pool gives up.
WORKER_START_TIMEOUT_S = 120.0

MULTIPLE_CHOICE = "multiple_choice"
MULTIPLE_CHOICE_BOXED = "multiple_choice_boxed"
BOXED_MATH = "boxed_math"
# Rewards every pool can grade with, whatever its configured reward: the math reward, the choice graders and the
# boxed grader of the paper's evaluation.
BUILTIN_REWARDS = ("math_verify", MULTIPLE_CHOICE, MULTIPLE_CHOICE_BOXED, BOXED_MATH)
# Data sources whose answers are option labels (compared lower-case without punctuation): LUFFY's
# out-of-distribution benchmarks (`arc_c`, `gpqa` in its released files) and their usual spellings.
MULTIPLE_CHOICE_SOURCES = frozenset({"arcc", "arcchallenge", "gpqa", "gpqadiamond", "mmlupro"})

# An option label: one capital letter, or one digit 1-9 (a few ARC-Challenge questions number their options).
_OPTION_LABEL = re.compile(r"\(?\s*([A-Z]|[1-9])\s*\)?")
# LaTeX text wrappers a model may put around a boxed label: \boxed{\text{C}}, \boxed{\textbf{(C)}}.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


class RewardError(RuntimeError):
    """Grading failed: a reward raised, or a grading worker died."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a module-level function `(response, ground_truth) -> float` under `name` (decorator)."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        same = existing is not None and (existing.__module__, existing.__qualname__) == (fn.__module__, fn.__qualname__)
        if existing is not None and not same:
            raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward registered under `name`; an unknown name is an error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UserError(f"unknown reward {name!r}; registered rewards: {known}") from None


def final_answer(response: str) -> str | None:
    """The graded part of a completion, as the released code splits it: the text between the first `</think>` and
    the second one (or the end), or None without a `</think>`.

    The response is the decoded completion, after the `<think>\\n` the chat template opened. The released code puts
    that prefix back first, which changes nothing here: no `</think>` starts inside it.
    """
    if THINK_CLOSE not in response:
        return None
    return response.split(THINK_CLOSE, 2)[1]


def _equivalent(answer: str, ground_truth: str) -> bool:
    """Whether math_verify finds the math in `answer` equal to `$ground_truth$`; never raises."""
    # math_verify's SIGALRM timeouts raise in any thread but the main one; elsewhere the caller bounds the time.
    bound = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${ground_truth}$", parsing_timeout=bound)
        predicted = parse(answer, parsing_timeout=bound)
        return bool(verify(gold, predicted, timeout_seconds=bound))
    except (Exception, TimeoutException):
        logger.debug("math_verify failed; graded wrong", exc_info=True)
        return False


@register_reward("math_verify")
def math_verify_reward(response: str, ground_truth: str) -> float:
    """LUFFY's reward (§1.2 of the algorithm notes): 1.0 if the answer (`final_answer`) equals `$ground_truth$`.

    Without `</think>` the reward is 0. Only the text between the first and the second `</think>` is graded, with
    math_verify.parse / verify. Never raises: anything unparsable scores 0.
    """
    answer = final_answer(response)
    return 1.0 if answer is not None and _equivalent(answer, ground_truth) else 0.0


# What `_normalized` removes: sizing and spacing commands, dollars, degree signs and percent signs.
_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\\quad|\$|\^\{?\\circ\}?|\\%|%|\s+")


def _normalized(answer: str) -> str:
    """A boxed answer in a canonical spelling: `\\text{}` wrappers unwrapped, `\\dfrac`/`\\tfrac` as `\\frac`,
    spacing, dollars, degree and percent signs dropped, a trailing period removed."""
    previous = None
    while previous != answer:
        previous, answer = answer, _TEXT_WRAPPER.sub(r"\1", answer)
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    return _NOISE.sub("", answer).rstrip(".")


@register_reward(BOXED_MATH)
def boxed_math_reward(response: str, ground_truth: str) -> float:
    """The grader of the paper's re-evaluated numbers (Oat's boxed grader, reimplemented): the last `\\boxed{}` of the
    answer is right if it equals the ground truth once both are normalised, or math_verify finds them equal.

    The answer is `final_answer`'s text; unlike the training reward, a response without `</think>` is graded whole.
    No `\\boxed{}` scores 0.
    """
    answer = final_answer(response)
    boxes = _boxed_contents(response if answer is None else answer)
    if not boxes:
        return 0.0
    predicted = boxes[-1]
    if _normalized(predicted) == _normalized(ground_truth):
        return 1.0
    return 1.0 if _equivalent(f"${predicted}$", ground_truth) else 0.0


def option_label(ground_truth: str) -> str | None:
    """The option a multiple-choice answer names ("C", "(C)", "2"), or None if it is not one option label."""
    match = _OPTION_LABEL.fullmatch(ground_truth.strip())
    return match.group(1) if match else None


def _boxed_contents(text: str) -> list[str]:
    """The contents of each `\\boxed{...}` / `\\fbox{...}` in order, nested braces included; unclosed ones skipped."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth == 0:
            contents.append(text[match.end() : end - 1])
    return contents


def chosen_option(answer: str, digits: bool = False, phrases: bool = True) -> str | None:
    """The option label (a capital letter; a digit 1-9 with `digits`) that an answer chooses, or None.

    1. The last `\\boxed{}` whose content, without `\\text{}`-style wrappers, `$`, `*` and spaces, starts with a
       label that stands alone: "C", "(C)", "C.", or followed by `)`, `.`, `:` or a space and the option text
       ("C) 10^-4 eV"). "Cat", "C,D" or "C.5" choose nothing.
    2. Else the last phrase "answer: X", "answer is X", "answer is (X)" ("answer" in any case, optionally followed
       by "choice"/"option"; GPQA's prompt asks for "ANSWER: X"), X not followed by a letter, a digit or ".5".
       Only with `phrases`: the released evaluation reads boxed labels alone.
    """
    label = "[1-9]" if digits else "[A-Z]"
    boxed_label = re.compile(rf"\(?({label})(?:\)|[.:]?(?:\s|$))")
    for content in reversed(_boxed_contents(answer)):
        previous = None
        while previous != content:
            previous, content = content, _TEXT_WRAPPER.sub(r"\1", content)
        match = boxed_label.match(content.replace("$", "").replace("*", "").strip())
        if match:
            return match.group(1)
    if not phrases:
        return None
    phrase = re.compile(
        rf"(?i:\banswer(?:\s+(?:choice|option))?(?:\s+is)?)\s*:?[\s*$]*\(?({label})(?![A-Za-z0-9]|\.\d)"
    )
    matches = list(phrase.finditer(answer))
    return matches[-1].group(1) if matches else None


def _graded_choice(response: str, ground_truth: str, phrases: bool) -> float:
    gold = option_label(ground_truth)
    if gold is None:
        raise ValueError(f"multiple-choice ground truth {ground_truth!r} is not an option label (A-Z or 1-9)")
    answer = final_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if chosen_option(answer, digits=gold.isdigit(), phrases=phrases) == gold else 0.0


@register_reward(MULTIPLE_CHOICE)
def multiple_choice_reward(response: str, ground_truth: str) -> float:
    """1.0 if the option chosen in the answer (`final_answer`; see `chosen_option`) is the ground truth's label.

    Without `</think>` the reward is 0, as for the math reward. A ground truth that is not an option label is a data
    error, not a wrong answer: it raises ValueError.
    """
    return _graded_choice(response, ground_truth, phrases=True)


@register_reward(MULTIPLE_CHOICE_BOXED)
def multiple_choice_boxed_reward(response: str, ground_truth: str) -> float:
    """The released evaluation's path for GPQA, ARC-c and MMLU-Pro: only a `\\boxed{}` label in the answer counts, so
    "ANSWER: C" or "the answer is (C)" without a box is wrong. Otherwise as `multiple_choice`."""
    return _graded_choice(response, ground_truth, phrases=False)


def select_reward(data_source: str, ground_truth: str, default: str) -> str:
    """The reward for one sample: `multiple_choice` for a multiple-choice benchmark (MULTIPLE_CHOICE_SOURCES) or an
    answer that is one option letter ("C", "(C)"; no math answer in LUFFY's benchmarks is), else `default`."""
    source = re.sub(r"[^a-z0-9]", "", data_source.lower())
    label = option_label(ground_truth)
    if source in MULTIPLE_CHOICE_SOURCES or (label is not None and label.isalpha()):
        return MULTIPLE_CHOICE
    return default


def _worker_main(conn: Connection, rewards: dict[str, RewardFn]) -> None:
    """Grading loop of one worker process: (index, response, ground_truth, reward name) in, (status, index, payload)
    out."""
    conn.send(("ready", -1, None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, ground_truth, name = task
        try:
            conn.send(("ok", index, float(rewards[name](response, ground_truth))))
        except Exception:
            conn.send(("error", index, traceback.format_exc()))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    index: int | None = None  # the sample being graded
    deadline: float = 0.0  # of the current sample, or of startup while not ready


class RewardPool:
    """Grades (response, ground_truth) pairs with reward `name` in `num_workers` processes, `timeout_s` per sample.

    `score` may name another reward per sample: any of BUILTIN_REWARDS or `extra_rewards`. A sample over the bound
    scores 0.0, is logged with its index (and listed, in index order, in `timeouts` after `score`), and its
    worker is killed and replaced. A reward that raises, or a worker that dies, fails `score` with RewardError and
    closes the pool. Use as a context manager or call `close()`.
    """

    def __init__(self, name: str, num_workers: int, timeout_s: float, extra_rewards: Sequence[str] = ()):
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.name = name
        self.timeout_s = float(timeout_s)
        self.timeouts: list[int] = []
        self._rewards = {n: get_reward(n) for n in dict.fromkeys((name, *BUILTIN_REWARDS, *extra_rewards))}
        self._context = multiprocessing.get_context("spawn")  # no fork of a process holding torch/vLLM threads
        self._workers: list[_Worker] = []
        self._closed = False
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._rewards), daemon=True, name=f"luffy-reward-{self.name}"
        )
        try:
            process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            self.close()
            raise ValueError(
                f"reward {self.name!r} (or one of {', '.join(self._rewards)}) cannot be sent to a worker process "
                f"(it must be a module-level function): {exc}"
            ) from None
        child_conn.close()
        return _Worker(process, parent_conn, deadline=time.monotonic() + WORKER_START_TIMEOUT_S)

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()

    def _fail(self, message: str) -> RewardError:
        self.close()
        return RewardError(message)

    @property
    def reward_names(self) -> list[str]:
        """The rewards `score` can grade with."""
        return list(self._rewards)

    def score(
        self, responses: list[str], ground_truths: list[str], rewards: Sequence[str] | None = None
    ) -> list[float]:
        """Rewards in input order, each sample graded with `rewards[i]` (default: the pool's reward)."""
        if self._closed:
            raise RewardError("the reward pool is closed")
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        names = [self.name] * len(responses) if rewards is None else list(rewards)
        if len(names) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(names)} reward names")
        unknown = sorted(set(names) - set(self._rewards))
        if unknown:
            raise ValueError(f"reward(s) {', '.join(unknown)} not in this pool (it grades with {self.reward_names})")
        results: list[float | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        self.timeouts = []
        remaining = len(responses)
        while remaining:
            for worker in self._workers:
                if worker.ready and worker.index is None and pending:
                    index = pending.popleft()
                    worker.conn.send((index, responses[index], ground_truths[index], names[index]))
                    worker.index, worker.deadline = index, time.monotonic() + self.timeout_s
            waiting = [w for w in self._workers if not w.ready or w.index is not None]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            wait([w.conn for w in waiting], timeout=wait_s)
            for slot, worker in enumerate(self._workers):
                if worker.conn.poll():
                    try:
                        status, index, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        worker.process.join(timeout=1.0)
                        raise self._fail(
                            f"reward worker (pid {worker.process.pid}) died with exit code {worker.process.exitcode}"
                            + (f" while grading sample {worker.index}" if worker.index is not None else "")
                        ) from None
                    if status == "ready":
                        worker.ready = True
                        continue
                    if status == "error":
                        raise self._fail(f"reward {names[index]!r} raised on sample {index}:\n{payload}")
                    results[index] = payload
                    worker.index = None
                    remaining -= 1
                elif time.monotonic() >= worker.deadline and (not worker.ready or worker.index is not None):
                    if not worker.ready:
                        raise self._fail(
                            f"reward worker did not start within {WORKER_START_TIMEOUT_S:.0f}s (reward {self.name!r})"
                        )
                    index = worker.index
                    logger.warning(
                        "reward %r: sample %d exceeded %.1fs; scored 0.0, worker pid %s killed and replaced",
                        names[index],
                        index,
                        self.timeout_s,
                        worker.process.pid,
                    )
                    self._kill(worker)
                    self._workers[slot] = self._start_worker()
                    results[index] = 0.0
                    self.timeouts.append(index)
                    remaining -= 1
        # Bounds that expire together are handled in worker order, not deadline order: list them by sample.
        self.timeouts.sort()
        return [float(r) for r in results]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):  # already closed by a kill
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            if worker.process.is_alive():
                self._kill(worker)
            else:
                worker.conn.close()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
