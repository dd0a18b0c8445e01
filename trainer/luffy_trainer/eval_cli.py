"""`luffy eval`: score a model on local benchmark files, as LUFFY evaluates (§3 of the algorithm notes).

The system message is removed and the model's own chat template applied; k answers are sampled per problem
(temperature 0.6, top-p 1.0, 8192 tokens by default) with the configured rollout backend; each is graded with the
math reward or the multiple-choice grader; avg@k and pass@k are reported per benchmark (data source) and averaged
over benchmarks. Results go to a directory (JSON, Markdown, every generation as JSON lines) and, when a tracking
server is configured, to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luffy_trainer.config import ConfigError, DataConfig, TrainConfig, parse_config
from luffy_trainer.evaluation import EvalResult, choose_graders, evaluate
from luffy_trainer.tracking import MlflowTracker

log = logging.getLogger(__name__)

DEFAULT_GRADER = "math_verify"
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
GENERATIONS = "generations.jsonl"


class WithoutSystemMessages:
    """A tokenizer whose chat template never sees system messages: LUFFY evaluates with the system prompt removed
    (`--remove_system`) and the model's own template. Everything else is the wrapped tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, conversation: list, **kwargs: Any) -> Any:
        def drop(messages: list[dict[str, str]]) -> list[dict[str, str]]:
            return [m for m in messages if m["role"] != "system"]

        batched = bool(conversation) and isinstance(conversation[0], list)
        return self._tokenizer.apply_chat_template(
            [drop(c) for c in conversation] if batched else drop(conversation), **kwargs
        )


def eval_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings as a TrainConfig, so the rollout factory and the data loader read what training reads."""
    data: dict[str, Any] = {
        "train_files": args.benchmark,
        "val_files": args.benchmark,
        "format": args.format,
        "max_prompt_length": args.max_prompt_length,
        "max_response_length": args.max_tokens,
        "overlong_prompt": "error",
    }
    if args.format == "flat":
        data["flat_columns"] = {"question": args.question_column, "answer": args.answer_column}
    return parse_config(
        {
            "model": {"path": args.model, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code},
            "data": data,
            "rollout": {
                "backend": args.backend,
                "server_urls": args.server_url,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_tokens": args.max_tokens,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "tensor_parallel_size": args.tensor_parallel_size,
                "enforce_eager": args.enforce_eager,
                "max_model_len": args.max_model_len,
            },
            "reward": {"name": DEFAULT_GRADER, "timeout_s": args.grade_timeout, "num_workers": args.grader_workers},
            "validation": {
                "samples_per_prompt": parse_samples(args.samples, [])[0],
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_tokens": args.max_tokens,
            },
            "optimization": {"seed": args.seed},
            "tracking": {
                "tracking_uri": args.tracking_uri,
                "experiment_name": args.experiment,
                "run_name": args.run_name,
                "system_metrics": False,
                "log_model": False,
            },
        },
        source="luffy eval arguments",
    )


def load_benchmarks(
    files: list[str],
    data_sources: list[str],
    data: DataConfig,
    tokenizer: Any,
    limit: int | None,
    distinct: bool = False,
) -> list[Any]:
    """Every file's problems in order, with `--data-source` names applied, repeated rows dropped with `distinct`, and
    at most `limit` per benchmark."""
    from luffy_trainer.data import load_examples

    if data_sources and len(data_sources) != len(files):
        raise ConfigError(
            f"--data-source was given {len(data_sources)} times for {len(files)} --benchmark files; "
            "give it once per --benchmark, in the same order, or not at all"
        )
    examples, taken, seen = [], Counter(), set()
    for i, file in enumerate(files):
        try:
            loaded = load_examples([file], data, tokenizer, require_traces=False).examples
        except (OSError, ValueError) as exc:
            hint = "; raise --max-prompt-length" if "max_prompt_length" in str(exc) else ""
            raise ConfigError(f"--benchmark {file}: {exc}{hint}") from None
        for ex in loaded:
            if data_sources:
                ex.data_source = data_sources[i]
            problem = (ex.data_source, ex.prompt_text, ex.ground_truth)
            if distinct and problem in seen:
                continue
            seen.add(problem)
            if limit is None or taken[ex.data_source] < limit:
                taken[ex.data_source] += 1
                examples.append(ex)
    return examples


def distinct_problems(examples: list[Any]) -> dict[str, int]:
    """Distinct (prompt, answer) pairs per benchmark. LUFFY's released file repeats each AIME/AMC problem 32 times,
    so that one sample per row is avg@32 per problem."""
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for ex in examples:
        seen[ex.data_source].add((ex.prompt_text, ex.ground_truth))
    return {source: len(pairs) for source, pairs in seen.items()}


def parse_samples(items: list[str], sources: list[str]) -> tuple[int, dict[str, int]]:
    """`--samples K` (every benchmark) and `--samples BENCHMARK=K`: the default k (1 unless given) and the overrides.
    With `sources` empty, benchmark names are not checked yet (they are known once the files are read)."""
    default, per_source = 1, {}
    for item in items:
        source, sep, raw = item.rpartition("=")
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"--samples {item}: expected K or BENCHMARK=K with K a positive integer")
        if sep and sources and source not in sources:
            raise ConfigError(f"--samples {item}: no benchmark {source!r}; benchmarks: {', '.join(sources)}")
        if sep:
            per_source[source] = value
        else:
            default = value
    return default, per_source


def parse_graders(items: list[str], sources: list[str]) -> dict[str, str]:
    """`--grader NAME` (every benchmark) and `--grader BENCHMARK=NAME`, as benchmark -> registered reward name."""
    from luffy_trainer.rewards import get_reward

    graders: dict[str, str] = {}
    for item in items:
        source, sep, name = item.rpartition("=")
        if sep and source not in sources:
            raise ConfigError(f"--grader {item}: no benchmark {source!r}; benchmarks: {', '.join(sources)}")
        try:
            get_reward(name)
        except ValueError as exc:
            raise ConfigError(f"--grader {item}: {exc}") from None
        graders.update({source: name} if sep else dict.fromkeys(sources, name))
    return graders


def results_document(
    result: EvalResult, args: argparse.Namespace, distinct: dict[str, int], created: str
) -> dict[str, Any]:
    """What results.json holds: the settings, each benchmark's scores and graders, and the average."""
    return {
        "model": args.model,
        "created": created,
        "benchmark_files": args.benchmark,
        "format": args.format,
        "system_prompt": "kept" if args.keep_system_prompt else "removed",
        "backend": args.backend,
        "samples": result.samples_per_source,
        "sampling": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        },
        "benchmarks": {
            source: {
                **scores,
                "problems": int(scores["problems"]),
                "samples": result.samples_per_source[source],
                "distinct_problems": distinct[source],
                "graders": result.graders[source],
            }
            for source, scores in result.by_source.items()
        },
        "average": result.mean,
        "average_over": list(result.by_source),
    }


def samples_text(result: EvalResult) -> str:
    """ "4 sample(s) per problem", or per benchmark when they differ."""
    counts = set(result.samples_per_source.values())
    if len(counts) == 1:
        return f"{counts.pop()} sample(s) per problem"
    return "samples per problem: " + ", ".join(f"{s} {k}" for s, k in result.samples_per_source.items())


def markdown_document(result: EvalResult, args: argparse.Namespace, created: str) -> str:
    return (
        f"# Evaluation of `{args.model}`\n\n"
        f"{created}: {samples_text(result)}, temperature {args.temperature}, top-p {args.top_p}, "
        f"at most {args.max_tokens} tokens, backend {args.backend}, system prompt "
        f"{'kept' if args.keep_system_prompt else 'removed'}. Scores in percent; the average is the unweighted "
        "mean over benchmarks.\n\n" + result.markdown()
    )


def write_outputs(result: EvalResult, document: dict[str, Any], markdown: str, output: Path) -> list[Path]:
    """results.json, results.md and generations.jsonl in `output` (created); returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / RESULTS_JSON, output / RESULTS_MARKDOWN, output / GENERATIONS]
    paths[0].write_text(json.dumps(document, indent=2) + "\n")
    paths[1].write_text(markdown)
    with paths[2].open("w", encoding="utf-8") as handle:
        for sample in result.samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return paths


@dataclass
class EvalTracking:
    """Where results are logged: the tracker, and the existing run to join (with the status it keeps) if any."""

    tracker: MlflowTracker
    attach: str | None
    previous_status: str | None


def connect_tracking(config: TrainConfig, args: argparse.Namespace) -> EvalTracking:
    """The MLflow tracker; a run to join (`--run-id` or MLFLOW_RUN_ID) is checked now, before the model loads."""
    from mlflow.exceptions import MlflowException

    tracker = MlflowTracker(config.tracking, workdir=args.output)
    attach = os.environ.get("MLFLOW_RUN_ID") or args.run_id
    previous_status = None
    if attach:
        try:
            previous_status = tracker.client.get_run(attach).info.status
        except MlflowException as exc:
            raise ConfigError(f"--run-id {attach}: cannot read this run at {tracker.uri}: {exc}") from None
    return EvalTracking(tracker, attach, previous_status)


def log_to_mlflow(tracking: EvalTracking, args: argparse.Namespace, result: EvalResult, files: list[Path]) -> str:
    """Params, `eval/<benchmark>/<score>` metrics at `--step`, and the output files as artifacts under
    `eval/step_<step>/`. A joined run (e.g. the training run of the model) keeps the status it had."""
    from mlflow.entities import Metric

    tracker = tracking.tracker
    params = {
        "eval.model": args.model,
        "eval.benchmark_files": ",".join(args.benchmark),
        "eval.samples": json.dumps(result.samples_per_source, sort_keys=True),
        "eval.temperature": str(args.temperature),
        "eval.top_p": str(args.top_p),
        "eval.max_tokens": str(args.max_tokens),
        "eval.seed": str(args.seed),
        "eval.backend": args.backend,
        "eval.system_prompt": "kept" if args.keep_system_prompt else "removed",
        "eval.graders": json.dumps(result.graders, sort_keys=True),
    }
    run_id = tracker.start(params, resume_run_id=tracking.attach)
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, args.step) for name, value in result.metrics("eval").items()]
        for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per request
            tracker.client.log_batch(run_id, metrics=metrics[start : start + 900])
        for path in files:
            tracker.client.log_artifact(run_id, str(path), artifact_path=f"eval/step_{args.step}")
        status = tracking.previous_status or "FINISHED"
    finally:
        tracker.finish(status, spill_dir=args.output)
    return run_id


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from luffy_trainer.rewards import RewardPool
    from luffy_trainer.rollout import build_rollout_engine
    from luffy_trainer.rollout.base import SamplingParams

    if args.run_id and not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("--run-id needs --tracking-uri (or MLFLOW_TRACKING_URI): which server holds the run?")
    default_k, samples_by_name = parse_samples(args.samples, [])
    if any(j > max([default_k, *samples_by_name.values()]) for j in args.pass_at):
        raise ConfigError(f"--pass-at {max(args.pass_at)} exceeds every --samples count")
    config = eval_config(args)
    tracking = connect_tracking(config, args) if args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {args.model}: cannot load its tokenizer: {exc}") from None
    view = tokenizer if args.keep_system_prompt else WithoutSystemMessages(tokenizer)
    examples = load_benchmarks(args.benchmark, args.data_source, config.data, view, args.limit, args.distinct)
    sources = sorted({ex.data_source for ex in examples})
    samples_by_name = parse_samples(args.samples, sources)[1]
    distinct = distinct_problems(examples)
    for source in sources:
        rows = sum(ex.data_source == source for ex in examples)
        if distinct[source] < rows:
            log.info(
                "benchmark %s: %d rows hold %d distinct problems; each row counts as a problem "
                "(avg@k over repeated rows is the mean over all their samples)",
                source,
                rows,
                distinct[source],
            )
    graders = parse_graders(args.grader, sources)
    try:
        choose_graders(examples, DEFAULT_GRADER, graders)  # fail on bad answers before the model loads
    except ValueError as exc:
        raise ConfigError(f"{exc}: --grader BENCHMARK=REWARD") from None
    v = config.validation
    params = SamplingParams(max_tokens=v.max_tokens, temperature=v.temperature, top_p=v.top_p)
    log.info("evaluating %s on %d problems of %s", args.model, len(examples), sources)
    with RewardPool(
        config.reward.name,
        config.reward.num_workers,
        config.reward.timeout_s,
        extra_rewards=sorted(set(graders.values())),
    ) as pool:
        engine = build_rollout_engine(config, args.model)
        try:
            result = evaluate(
                engine,
                examples,
                tokenizer,
                pool,
                params,
                v.samples_per_prompt,
                seed=config.optimization.seed,
                graders=graders,
                pass_at_j=args.pass_at,
                samples_per_source=samples_by_name,
            )
        finally:
            engine.close()
        if pool.timeouts:
            log.warning("%d sample(s) took longer than %.0fs to grade and scored 0", len(pool.timeouts), pool.timeout_s)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    markdown = markdown_document(result, args, created)
    files = write_outputs(result, results_document(result, args, distinct, created), markdown, Path(args.output))
    print(result.markdown(), end="")
    print(f"results: {files[0]}, {files[1]}; generations: {files[2]}")
    if tracking is not None:
        run_id = log_to_mlflow(tracking, args, result, files)
        print(f"MLflow run: {run_id}")
    return 0
