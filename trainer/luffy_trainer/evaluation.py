"""Held-out evaluation: sample k answers per problem, grade them, report avg@k and pass@k per benchmark.

A benchmark is a data source. avg@k is the mean correctness of the k samples of a problem, averaged over problems;
pass@k the fraction of problems with at least one correct sample. Benchmarks may have their own k (the paper uses
avg@32 on AIME and AMC and avg@1 elsewhere); then every benchmark also reports `samples` and `accuracy`, its avg@k,
and the mean over benchmarks of `accuracy` is the paper's average. pass@j for j < k uses the unbiased estimator of
Chen et al. (2021), 1 - C(n-c, j) / C(n, j) for c correct samples out of n. The average over benchmarks is the
unweighted mean, as LUFFY reports it (§3 of the algorithm notes). Each sample is graded with the reward
`rewards.select_reward` picks (math or multiple choice) unless a benchmark's grader is given.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any

from luffy_trainer.rewards import MULTIPLE_CHOICE, option_label, select_reward
from luffy_trainer.rollout.base import RolloutEngine, SamplingParams
from luffy_trainer.tracking import metric_name

COUNT_KEYS = ("problems", "samples")  # per-benchmark counts: not averaged over benchmarks
RESPONSE_STAT_TITLES = {"response_tokens": "tokens", "truncated": "truncated %"}
# MLflow metric names allow letters, digits, `_ - . / :` and spaces; a benchmark name is one path segment.
_UNSAFE_METRIC_CHARS = re.compile(r"[^\w.\- ]")


def pass_at(n: int, c: int, j: int) -> float:
    """Unbiased pass@j of one problem from n samples with c correct: 1 - C(n-c, j) / C(n, j)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples must be in [0, {n}], got {c}")
    if not 1 <= j <= n:
        raise ValueError(f"pass@j needs 1 <= j <= n = {n}, got j = {j}")
    return 1.0 - comb(n - c, j) / comb(n, j)


@dataclass
class EvalResult:
    """Scores by benchmark (data source) and their unweighted mean over benchmarks."""

    k: int
    by_source: dict[str, dict[str, float]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    graders: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> rewards that graded it
    samples_per_source: dict[str, int] = field(default_factory=dict)  # benchmark -> its samples per problem

    @property
    def mean(self) -> dict[str, float]:
        """Each score (and response statistic) every benchmark has, averaged over benchmarks, each weighing the same."""
        keys = [
            key
            for key in next(iter(self.by_source.values()))
            if key not in COUNT_KEYS and all(key in s for s in self.by_source.values())
        ]
        return {key: sum(s[key] for s in self.by_source.values()) / len(self.by_source) for key in keys}

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """MLflow metric names such as `val/<benchmark>/avg_at_k` and `val/mean/avg_at_k` (`avg@k` spelled as
        `tracking.metric_name` logs it; other characters MLflow refuses in a benchmark name become `_`)."""
        names: dict[str, str] = {}
        for source in self.by_source:
            name = _UNSAFE_METRIC_CHARS.sub("_", source)
            if name in names.values() or name == "mean":
                raise ValueError(
                    f"benchmark {source!r} would log as {name!r}, a name already taken (by another "
                    "benchmark or the mean)"
                )
            names[source] = name
        out = {
            metric_name(f"{prefix}/{names[source]}/{key}"): value
            for source, scores in self.by_source.items()
            for key, value in scores.items()
        }
        out.update({metric_name(f"{prefix}/mean/{key}"): value for key, value in self.mean.items()})
        return out

    def markdown(self) -> str:
        """The results table: one row per benchmark and the average; scores in percent, as the paper prints them,
        then the mean response length and the share of responses cut at the token limit (when measured)."""
        keys = dict.fromkeys(key for s in self.by_source.values() for key in s)
        scores = [key for key in keys if key.startswith(("avg@", "pass@")) or key == "accuracy"]
        stats = [key for key in ("response_tokens", "truncated") if key in self.mean]
        header = ["benchmark", "problems", *scores, *(RESPONSE_STAT_TITLES[key] for key in stats)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

        def row(name: str, problems: str, values: dict[str, float]) -> str:
            cells = [name, problems, *(f"{100 * values[key]:.1f}" if key in values else "-" for key in scores)]
            if "response_tokens" in stats:
                cells.append(f"{values['response_tokens']:.0f}")
            if "truncated" in stats:
                cells.append(f"{100 * values['truncated']:.1f}")
            return "| " + " | ".join(cells) + " |"

        for source, values in self.by_source.items():
            lines.append(row(source, f"{values['problems']:.0f}", values))
        lines.append(row(f"**average ({len(self.by_source)})**", "", self.mean))
        return "\n".join(lines) + "\n"


def score_problems(
    correct: Sequence[Sequence[bool]],
    sources: Sequence[str],
    k: int | Mapping[str, int],
    pass_at_j: Sequence[int] = (),
) -> dict[str, dict[str, float]]:
    """Per source: `problems`, `avg@k`, `pass@j` for each j < k asked for (unbiased estimator), `pass@k`; with a
    mapping `k` (samples per source), also `samples` and `accuracy` (= avg@k)."""
    per_source_k = isinstance(k, Mapping)
    per_source: dict[str, list[Sequence[bool]]] = defaultdict(list)
    for row, source in zip(correct, sources, strict=True):
        expected = k[source] if per_source_k else k
        if len(row) != expected:
            raise ValueError(f"expected {expected} graded samples per problem of {source!r}, got {len(row)}")
        per_source[source].append(row)
    out = {}
    for source, rows in sorted(per_source.items()):
        n = k[source] if per_source_k else k
        ks = sorted(set(pass_at_j) - {n})
        if per_source_k:  # pass@j is reported where a benchmark has more than j samples
            ks = [j for j in ks if j < n]
        if any(not 1 <= j < n for j in ks):
            raise ValueError(f"pass@j needs 1 <= j <= k = {n}, got {sorted(set(pass_at_j))}")
        avg = sum(sum(r) / n for r in rows) / len(rows)
        scores = {"problems": float(len(rows)), f"avg@{n}": avg}
        for j in ks:
            scores[f"pass@{j}"] = sum(pass_at(n, sum(r), j) for r in rows) / len(rows)
        scores[f"pass@{n}"] = sum(any(r) for r in rows) / len(rows)
        if per_source_k:
            scores.update(samples=float(n), accuracy=avg)
        out[source] = scores
    return out


def choose_graders(examples: Sequence[Any], default: str, graders: Mapping[str, str] | None = None) -> list[str]:
    """The reward of each example: its benchmark's entry in `graders`, else `select_reward` (`default` for math).

    Checked before anything is generated: a multiple-choice problem whose answer is not an option label fails here,
    naming the benchmark, the problem and the override that grades it as math instead.
    """
    graders = graders or {}
    names, position = [], defaultdict(int)
    for ex in examples:
        source = ex.data_source or "val"
        name = graders.get(source) or select_reward(source, ex.ground_truth, default)
        if name == MULTIPLE_CHOICE and option_label(ex.ground_truth) is None:
            raise ValueError(
                f"benchmark {source!r} problem {position[source]}: ground truth {ex.ground_truth!r} is not an option "
                f"label (A-Z or 1-9) for multiple-choice grading; to grade the benchmark as math, set its grader "
                f"to math_verify (--set graders.{source}=math_verify)"
            )
        position[source] += 1
        names.append(name)
    return names


def evaluate(
    engine: RolloutEngine,
    examples: Sequence[Any],
    tokenizer: Any,
    reward_pool: Any,
    params: SamplingParams,
    k: int,
    seed: int | None = None,
    *,
    graders: Mapping[str, str] | None = None,
    pass_at_j: Sequence[int] = (),
    samples_per_source: Mapping[str, int] | None = None,
) -> EvalResult:
    """Generate k answers per example (`prompt_ids`, `ground_truth`, `data_source`, `prompt_text`), grade, aggregate.

    `samples_per_source` overrides k for some benchmarks. `graders` maps a benchmark to a reward name; the others are
    chosen per sample by `rewards.select_reward`, with the pool's own reward for math answers. Every chosen reward
    must be one the pool grades with.
    """
    names = choose_graders(examples, reward_pool.name, graders)
    missing = sorted(set(names) - set(reward_pool.reward_names))
    if missing:
        raise ValueError(f"the reward pool cannot grade with {', '.join(missing)} (it has {reward_pool.reward_names})")
    sources = [ex.data_source or "val" for ex in examples]
    counts = {source: (samples_per_source or {}).get(source, k) for source in sources}
    completions: list[list[Any]] = [[] for _ in examples]
    for n in sorted(set(counts.values())):  # one generation call per sample count
        batch = [i for i, source in enumerate(sources) if counts[source] == n]
        generated = engine.generate([examples[i].prompt_ids for i in batch], n, params, seed=seed)
        for i, outs in zip(batch, generated, strict=True):
            completions[i] = outs
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=False) for outs in completions for c in outs]
    rewards = reward_pool.score(
        texts,
        [ex.ground_truth for ex, outs in zip(examples, completions, strict=True) for _ in outs],
        [name for name, outs in zip(names, completions, strict=True) for _ in outs],
    )
    correct, position = [], 0
    for outs in completions:
        correct.append([r > 0.5 for r in rewards[position : position + len(outs)]])
        position += len(outs)
    by_source = score_problems(correct, sources, counts if samples_per_source else k, pass_at_j)
    samples, index = [], defaultdict(int)
    lengths: dict[str, list[int]] = defaultdict(list)
    truncated: dict[str, list[bool]] = defaultdict(list)
    used: dict[str, set[str]] = defaultdict(set)
    position = 0
    for i, (ex, source, outs) in enumerate(zip(examples, sources, completions, strict=True)):
        used[source].add(names[i])
        for j, completion in enumerate(outs):
            lengths[source].append(len(completion.token_ids))
            truncated[source].append(completion.finish_reason == "length")
            samples.append(
                {
                    "benchmark": source,
                    "index": index[source],
                    "sample": j,
                    "prompt": ex.prompt_text,
                    "response": texts[position + j],
                    "ground_truth": ex.ground_truth,
                    "grader": names[i],
                    "reward": rewards[position + j],
                    "finish_reason": completion.finish_reason,
                    "response_tokens": len(completion.token_ids),
                }
            )
        position += len(outs)
        index[source] += 1
    for source, scores in by_source.items():
        scores["response_tokens"] = sum(lengths[source]) / len(lengths[source])
        scores["truncated"] = sum(truncated[source]) / len(truncated[source])
    return EvalResult(
        k=k,
        by_source=by_source,
        samples=samples,
        graders={s: sorted(used[s]) for s in by_source},
        samples_per_source={s: counts[s] for s in by_source},
    )
