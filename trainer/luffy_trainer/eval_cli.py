"""`luffy eval`: score a model on local benchmark files, as LUFFY evaluates (§3 of the algorithm notes).

`luffy eval CONFIG.yaml --set key=value` reads an EvalConfig (examples/eval-paper-math.yaml), loaded and overridden
as `luffy train` loads its config. The system message is removed and the model's own chat template applied; k answers
are sampled per problem (temperature 0.6, top-p 1.0, 8192 tokens by default) with the configured rollout backend;
each is graded with the math reward or the multiple-choice grader; avg@k and pass@k are reported per benchmark (data
source) and averaged over benchmarks. Results go to a directory (JSON, Markdown, every generation as JSON lines) and,
when a tracking server is configured, to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from luffy_trainer import contract
from luffy_trainer.config import (
    ConfigError,
    DataConfig,
    DataFormat,
    FlatColumns,
    LuffyColumns,
    ModelConfig,
    NonNegativeFloat,
    OptimizationConfig,
    OverlongPolicy,
    PositiveInt,
    RewardConfig,
    RolloutConfig,
    Section,
    TrackingConfig,
    TrackingServerConfig,
    TrainConfig,
    UserError,
    load_config,
)
from luffy_trainer.evaluation import EvalResult, choose_graders, evaluate
from luffy_trainer.tracking import MlflowTracker

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
GENERATIONS = "generations.jsonl"


class EvalDataConfig(Section):
    """The benchmark files and how their rows are read (the formats of training data)."""

    files: list[str] = Field(min_length=1, description="Parquet, JSONL or `datasets` directories with the problems.")
    names: list[str] = Field(
        default_factory=list,
        description="Benchmark name of each file, in order; default: its data_source column, else the file name.",
    )
    format: DataFormat = Field("luffy", description="`luffy`: the released verl schema; `flat`: named columns.")
    luffy_columns: LuffyColumns = Field(default_factory=LuffyColumns)
    flat_columns: FlatColumns = Field(default_factory=FlatColumns)
    max_prompt_length: PositiveInt = Field(1024, description="Longest templated prompt, in tokens.")
    overlong_prompt: OverlongPolicy = Field("error", description="What to do with a problem over maxPromptLength.")
    keep_system_prompt: bool = Field(False, description="Keep system messages (LUFFY removes them).")
    distinct: bool = Field(
        False, description="Keep one row per distinct problem (LUFFY's released file repeats AIME/AMC rows 32 times)."
    )
    limit: PositiveInt | None = Field(None, description="Evaluate the first N problems of each benchmark.")

    @model_validator(mode="after")
    def _one_name_per_file(self) -> EvalDataConfig:
        if self.names and len(self.names) != len(self.files):
            raise ValueError(
                f"names has {len(self.names)} entries for {len(self.files)} files: one per file, in order, or none"
            )
        return self


class EvalRolloutConfig(RolloutConfig):
    """The rollout section, with the paper's evaluation sampling as defaults."""

    temperature: NonNegativeFloat = Field(0.6, description="Sampling temperature.")
    max_tokens: PositiveInt = Field(8192, description="Longest answer, in tokens.")
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.9, description="Fraction of GPU memory the in-process vLLM engine may take."
    )


class EvalTrackingConfig(TrackingServerConfig):
    """MLflow logging of the results: a new run of `experimentName`, or the existing run `runId` (the model's
    training run, say) at `step`. MLFLOW_TRACKING_URI and MLFLOW_RUN_ID win."""

    tracking_uri: str | None = Field(None, description="MLflow server URI; null: results are only written to files.")
    experiment_name: str = Field("luffy-eval", description="MLflow experiment of a new run.")
    run_id: str | None = Field(None, description="Log into this existing run instead of a new one.")
    step: int = Field(0, description="MLflow step of the metrics (the checkpoint's training step).")


class EvalConfig(Section):
    """An evaluation: `luffy eval CONFIG` reads one of these."""

    model: ModelConfig = Field(description="The model to score; its tokenizer and chat template are used.")
    data: EvalDataConfig
    rollout: EvalRolloutConfig = Field(default_factory=EvalRolloutConfig)
    reward: RewardConfig = Field(
        default_factory=RewardConfig,
        description="Grading: `name` grades math answers (multiple-choice benchmarks get multiple_choice).",
    )
    samples: PositiveInt = Field(1, description="Samples per problem: the k of avg@k and pass@k.")
    samples_per_benchmark: dict[str, PositiveInt] = Field(
        default_factory=dict, description="Benchmark name -> its own samples per problem."
    )
    pass_at: list[PositiveInt] = Field(default_factory=list, description="Also report pass@j for each j below k.")
    graders: dict[str, str] = Field(
        default_factory=dict,
        description="Benchmark name -> the registered reward that grades it, instead of the automatic choice.",
    )
    seed: int = Field(47, description="Sampling seed.")
    output_dir: str = Field("eval_results", description="Directory of results.json, results.md, generations.jsonl.")
    tracking: EvalTrackingConfig = Field(default_factory=EvalTrackingConfig)

    @model_validator(mode="after")
    def _pass_at_below_some_k(self) -> EvalConfig:
        most = max([self.samples, *self.samples_per_benchmark.values()])
        if any(j > most for j in self.pass_at):
            raise ValueError(f"pass_at {max(self.pass_at)} exceeds every sample count (samples, samplesPerBenchmark)")
        return self

    def train_view(self) -> TrainConfig:
        """These settings as a TrainConfig, so the rollout factory, the data loader and the tracker read what
        training reads."""
        d = self.data
        data = DataConfig(
            train_files=d.files,
            format=d.format,
            luffy_columns=d.luffy_columns,
            flat_columns=d.flat_columns,
            max_prompt_length=d.max_prompt_length,
            max_response_length=self.rollout.max_tokens,
            overlong_prompt=d.overlong_prompt,
        )
        server = self.tracking.model_dump(include=set(TrackingServerConfig.model_fields))
        return TrainConfig(
            model=self.model,
            data=data,
            rollout=self.rollout,
            reward=self.reward,
            optimization=OptimizationConfig(seed=self.seed),
            tracking=TrackingConfig(**server, system_metrics=False, log_model=False),
        )


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


def load_benchmarks(config: EvalConfig, data: DataConfig, tokenizer: Any) -> list[Any]:
    """Every file's problems in order, with `data.names` applied, repeated rows dropped with `data.distinct`, and at
    most `data.limit` per benchmark."""
    from luffy_trainer.data import load_examples

    d = config.data
    examples, taken, seen = [], Counter(), set()
    for i, file in enumerate(d.files):
        for ex in load_examples([file], data, tokenizer, require_traces=False).examples:
            if d.names:
                ex.data_source = d.names[i]
            problem = (ex.data_source, ex.prompt_text, ex.ground_truth)
            if d.distinct and problem in seen:
                continue
            seen.add(problem)
            if d.limit is None or taken[ex.data_source] < d.limit:
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


def check_benchmarks_and_graders(config: EvalConfig, sources: list[str]) -> None:
    """`samplesPerBenchmark` and `graders` name benchmarks that exist, and every grader is a registered reward."""
    from luffy_trainer.rewards import get_reward

    for field, names in (("samples_per_benchmark", config.samples_per_benchmark), ("graders", config.graders)):
        for name in names:
            if name not in sources:
                raise ConfigError(f"{field}.{name}: no benchmark {name!r}; benchmarks: {', '.join(sources)}")
    rewards = {"reward.name": config.reward.name, **{f"graders.{n}": r for n, r in config.graders.items()}}
    for field, reward in rewards.items():
        try:
            get_reward(reward)
        except UserError as exc:
            raise ConfigError(f"{field}: {exc}") from None


def results_document(result: EvalResult, config: EvalConfig, distinct: dict[str, int], created: str) -> dict[str, Any]:
    """What results.json holds: the settings, each benchmark's scores and graders, and the average."""
    r = config.rollout
    return {
        "model": config.model.path,
        "created": created,
        "benchmark_files": config.data.files,
        "format": config.data.format,
        "system_prompt": system_prompt_text(config),
        "backend": r.backend,
        "samples": result.samples_per_source,
        "sampling": {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens, "seed": config.seed},
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


def system_prompt_text(config: EvalConfig) -> str:
    return "kept" if config.data.keep_system_prompt else "removed"


def samples_text(result: EvalResult) -> str:
    """ "4 sample(s) per problem", or per benchmark when they differ."""
    counts = set(result.samples_per_source.values())
    if len(counts) == 1:
        return f"{counts.pop()} sample(s) per problem"
    return "samples per problem: " + ", ".join(f"{s} {k}" for s, k in result.samples_per_source.items())


def markdown_document(result: EvalResult, config: EvalConfig, created: str) -> str:
    r = config.rollout
    return (
        f"# Evaluation of `{config.model.path}`\n\n"
        f"{created}: {samples_text(result)}, temperature {r.temperature}, top-p {r.top_p}, "
        f"at most {r.max_tokens} tokens, backend {r.backend}, system prompt {system_prompt_text(config)}. "
        "Scores in percent; the average is the unweighted mean over benchmarks.\n\n" + result.markdown()
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


def connect_tracking(config: EvalConfig, tracking: TrackingConfig) -> MlflowTracker | None:
    """The MLflow tracker when a server is configured, with the server (and the run to join) reached now, before
    the model loads; None without a server."""
    run_id = os.environ.get(contract.ENV_MLFLOW_RUN_ID) or config.tracking.run_id
    if not (os.environ.get(contract.ENV_MLFLOW_TRACKING_URI) or tracking.tracking_uri):
        if run_id:
            raise ConfigError("tracking.run_id needs tracking.tracking_uri (or MLFLOW_TRACKING_URI): which server?")
        return None
    tracker = MlflowTracker(tracking, workdir=config.output_dir)
    tracker.connect(run_id)
    return tracker


def log_to_mlflow(tracker: MlflowTracker, config: EvalConfig, result: EvalResult, files: list[Path]) -> str:
    """Params, the benchmark files as `evaluation` datasets, `eval/<benchmark>/<score>` metrics at `tracking.step`,
    and the output files as artifacts under `eval/step_<step>/`. A joined run (e.g. the training run of the model)
    keeps its status and source tags."""
    r, step = config.rollout, config.tracking.step
    params = {
        "eval.model": config.model.path,
        "eval.benchmark_files": ",".join(config.data.files),
        "eval.samples": json.dumps(result.samples_per_source, sort_keys=True),
        "eval.temperature": str(r.temperature),
        "eval.top_p": str(r.top_p),
        "eval.max_tokens": str(r.max_tokens),
        "eval.seed": str(config.seed),
        "eval.backend": r.backend,
        "eval.system_prompt": system_prompt_text(config),
        "eval.graders": json.dumps(result.graders, sort_keys=True),
    }
    run_id = tracker.start(params, resume_run_id=config.tracking.run_id)
    status = tracker.previous_status or "FAILED"
    try:
        if tracker.previous_status is None:
            tracker.log_code_version("luffy eval")
        tracker.log_datasets({"evaluation": config.data.files})
        tracker.log_results(step, result.metrics("eval"))
        for path in files:
            tracker.log_artifact(path, f"eval/step_{step}")
        status = tracker.previous_status or "FINISHED"
    finally:
        tracker.finish(status, spill_dir=config.output_dir)
    return run_id


def main(args: argparse.Namespace) -> int:
    from luffy_trainer.policy import load_tokenizer
    from luffy_trainer.rewards import RewardPool
    from luffy_trainer.rollout import build_rollout_engine
    from luffy_trainer.rollout.base import SamplingParams

    config = load_config(args.config, args.overrides, EvalConfig)
    view = config.train_view()
    tracker = connect_tracking(config, view.tracking)
    tokenizer = load_tokenizer(config.model)
    templated = tokenizer if config.data.keep_system_prompt else WithoutSystemMessages(tokenizer)
    examples = load_benchmarks(config, view.data, templated)
    sources = sorted({ex.data_source for ex in examples})
    check_benchmarks_and_graders(config, sources)
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
    try:
        choose_graders(examples, config.reward.name, config.graders)  # fail on bad answers before the model loads
    except ValueError as exc:
        raise UserError(str(exc)) from None
    r = config.rollout
    params = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    log.info("evaluating %s on %d problems of %s", config.model.path, len(examples), sources)
    reward = config.reward
    with RewardPool(
        reward.name, reward.num_workers, reward.timeout_s, extra_rewards=sorted(set(config.graders.values()))
    ) as pool:
        engine = build_rollout_engine(view, config.model.path)
        try:
            result = evaluate(
                engine,
                examples,
                tokenizer,
                pool,
                params,
                config.samples,
                seed=config.seed,
                graders=config.graders,
                pass_at_j=config.pass_at,
                samples_per_source=config.samples_per_benchmark,
            )
        finally:
            engine.close()
        if pool.timeouts:
            log.warning("%d sample(s) took longer than %.0fs to grade and scored 0", len(pool.timeouts), pool.timeout_s)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    markdown = markdown_document(result, config, created)
    document = results_document(result, config, distinct, created)
    files = write_outputs(result, document, markdown, Path(config.output_dir))
    print(result.markdown(), end="")
    print(f"results: {files[0]}, {files[1]}; generations: {files[2]}")
    if tracker is not None:
        print(f"MLflow run: {log_to_mlflow(tracker, config, result, files)}")
    return 0
