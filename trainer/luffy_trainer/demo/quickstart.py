"""`luffy quickstart` (what `make run` and `make compare` run): LUFFY on a tiny model and a generated task, on CPU.

Stage 1 (once, cached under the work directory): build the tiny model and the task (tasks.py), then a supervised
warm-up on one-step sums gives a "base model" that knows the answer format and every addition fact, but has never
chained them. Its own success rate on the training problems is measured at the rollout temperature and printed: it is
what on-policy RL has to start from.
Stage 2: train each requested variant from that base model with the same step budget, once per seed, and print the
held-out accuracy of each (mean and min-max over seeds) and one verdict line: LUFFY's lead over GRPO, per seed.
Every run is tracked in the local MLflow store; with `--plot` the learning curves are drawn and logged too.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from statistics import mean

from luffy_trainer.config import load_config
from luffy_trainer.demo.tasks import constant_answer_accuracy, write_arithmetic_task
from luffy_trainer.demo.tiny import TinyModelShape, make_tiny_model

log = logging.getLogger(__name__)

QUICKSTART_MODEL = TinyModelShape()
# Stage 1's config ships with the package, so a cluster job can prepare the quickstart from the image alone.
BASE_CONFIG = files("luffy_trainer.demo") / "quickstart_base.yaml"
# How the base model's success on the training problems is measured: pass@8 over this many problems.
BASE_PROBLEMS = 512
BASE_SAMPLES = 8
BASE_SCORES_FILE = "base_scores.json"


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: an algorithm mode and the settings the paper's run of it used."""

    label: str
    overrides: tuple[str, ...]


# The paper's rows, as the released scripts run them: on-policy GRPO with 8 samples and PPO clip 0.2; SFT on the
# traces; RL with an SFT loss; LUFFY without policy shaping (plain importance weights, f(p) = p).
VARIANTS: dict[str, Variant] = {
    "luffy": Variant("LUFFY", ("algorithm.mode=luffy",)),
    "grpo": Variant("on-policy GRPO", ("algorithm.mode=grpo", "algorithm.n_on_policy=8", "algorithm.clip_eps=0.2")),
    "sft": Variant("SFT on the traces", ("algorithm.mode=sft", "algorithm.n_on_policy=0")),
    "rl_sft_loss": Variant("RL with SFT loss", ("algorithm.mode=rl_sft_loss",)),
    "luffy_no_shaping": Variant("LUFFY without shaping", ("algorithm.mode=luffy", "algorithm.gamma=null")),
}


def _paths(workdir: Path) -> dict[str, Path]:
    return {
        "model": workdir / "model",
        "data": workdir / "data",
        "base": workdir / "base",
        "base_model": workdir / "base" / "final",
    }


def prepare(workdir: Path, base_config: str | None = None, extra: list[str] | None = None) -> Path:
    """Build the tiny model, the task data and (stage 1) the base model unless they exist; returns the base model."""
    from luffy_trainer.train import LuffyTrainer

    paths = _paths(workdir)
    if not (paths["model"] / "config.json").is_file():
        log.info("building the tiny model in %s", paths["model"])
        make_tiny_model(paths["model"], seed=0, shape=QUICKSTART_MODEL)
    if not (paths["data"] / "train.parquet").is_file():
        log.info("writing the arithmetic task to %s", paths["data"])
        write_arithmetic_task(paths["data"])
    if not (paths["base_model"] / "config.json").is_file():
        log.info("stage 1: supervised warm-up of the base model (one-step sums)")
        (paths["base"] / BASE_SCORES_FILE).unlink(missing_ok=True)
        overrides = [
            f"model.path={paths['model']}",
            f"data.train_files=[{paths['data'] / 'base.parquet'}]",
            f"checkpoint.dir={workdir / 'checkpoints' / 'base'}",
            f"output_dir={paths['base']}",
            *(extra or []),
        ]
        LuffyTrainer(load_config(base_config or str(BASE_CONFIG), overrides)).run()
    return paths["base_model"]


def base_scores(config_path: str, workdir: Path) -> dict:
    """The base model measured once (cached beside it): its pass@1 and pass@8 on training problems, sampled as
    on-policy rollouts are, and its held-out accuracy, sampled as validation is (step 0 of every curve)."""
    cached = _paths(workdir)["base"] / BASE_SCORES_FILE
    if cached.is_file():
        return json.loads(cached.read_text())
    from transformers import AutoTokenizer

    from luffy_trainer.data import load_examples
    from luffy_trainer.evaluation import evaluate
    from luffy_trainer.rewards import RewardPool
    from luffy_trainer.rollout import build_rollout_engine
    from luffy_trainer.rollout.base import SamplingParams

    paths = _paths(workdir)
    config = load_config(config_path, _stage2_paths(workdir))
    tokenizer = AutoTokenizer.from_pretrained(paths["base_model"])
    train = load_examples(config.data.train_files, config.data, tokenizer, require_traces=False).examples
    val = load_examples(config.data.val_files, config.data, tokenizer, require_traces=False).examples
    r, v = config.rollout, config.validation
    rollout_params = SamplingParams(config.rollout_max_tokens, r.temperature, r.top_p, r.top_k)
    val_params = SamplingParams(v.max_tokens or config.data.max_response_length, v.temperature, v.top_p)
    log.info("measuring the base model: %d training problems x %d samples, then the held-out set", BASE_PROBLEMS, 8)
    with RewardPool(config.reward.name, config.reward.num_workers, config.reward.timeout_s) as pool:
        engine = build_rollout_engine(config, str(paths["base_model"]))
        try:
            on_train = evaluate(
                engine, train[:BASE_PROBLEMS], tokenizer, pool, rollout_params, BASE_SAMPLES, seed=0, pass_at_j=[1]
            )
            held_out = evaluate(engine, val, tokenizer, pool, val_params, v.samples_per_prompt, seed=0)
        finally:
            engine.close()
    scores = next(iter(on_train.by_source.values()))
    key = f"avg@{held_out.k}"
    measured = {
        "problems": len(train[:BASE_PROBLEMS]),
        "pass@1": scores["pass@1"],
        f"pass@{BASE_SAMPLES}": scores[f"pass@{BASE_SAMPLES}"],
        "heldout": {**{s: x[key] for s, x in held_out.by_source.items()}, "mean": held_out.mean[key]},
    }
    cached.write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def _stage2_paths(workdir: Path) -> list[str]:
    paths = _paths(workdir)
    return [
        f"model.path={paths['base_model']}",
        f"data.train_files=[{paths['data'] / 'train.parquet'}]",
        f"data.val_files=[{paths['data'] / 'val.parquet'}]",
    ]


def run_variant(config_path: str, workdir: Path, name: str, seed: int, extra: list[str]):
    """Stage 2: train variant `name` from the base model with seed `seed` and the budget every variant gets."""
    from luffy_trainer.train import LuffyTrainer

    tag = f"{name}-seed{seed}"
    checkpoints, outputs = workdir / "checkpoints" / tag, workdir / "outputs" / tag
    shutil.rmtree(checkpoints, ignore_errors=True)  # each quickstart run starts again from the base model
    overrides = [
        *_stage2_paths(workdir),
        f"optimization.seed={seed}",
        f"checkpoint.dir={checkpoints}",
        f"output_dir={outputs}",
        f"tracking.run_name=quickstart-{tag}",
        *VARIANTS[name].overrides,
        *extra,
    ]
    return LuffyTrainer(load_config(config_path, overrides)).run()


def held_out_curves(
    results: dict[str, dict[int, object]], base: dict[str, float]
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """variant -> step -> score name (each benchmark and `mean`) -> one value per seed, in seed order; step 0 is the
    base model every variant starts from."""
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}
    for name, by_seed in results.items():
        curves[name] = {0: {score: [value] * len(by_seed) for score, value in base.items()}}
        for result in by_seed.values():
            for step, val in sorted(result.validation_history.items()):
                key = f"avg@{val.k}"
                scores = {source: s[key] for source, s in val.by_source.items()} | {"mean": val.mean[key]}
                at = curves[name].setdefault(step, {})
                for score, value in scores.items():
                    at.setdefault(score, []).append(value)
    return curves


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def answer_floors(workdir: Path) -> dict[str, float]:
    """Per held-out benchmark (and their mean), the accuracy of always giving its most common answer."""
    import pyarrow.parquet as pq

    rows = pq.read_table(_paths(workdir)["data"] / "val.parquet").to_pylist()
    floors = {
        s: constant_answer_accuracy([r for r in rows if r["data_source"] == s])
        for s in {r["data_source"] for r in rows}
    }
    return {**floors, "mean": sum(floors.values()) / len(floors)}


def comparison_table(
    curves: dict[str, dict[int, dict[str, list[float]]]], seeds: list[int], k: int, floors: dict[str, float]
) -> str:
    """Held-out avg@k of the base model and of every variant at its last step, as Markdown: the mean over seeds and,
    with several seeds, the (min-max); `floors` is what always giving the most common answer would score."""
    if not curves:
        return "no validation results"
    sources = sorted({s for steps in curves.values() for at in steps.values() for s in at if s != "mean"})
    spread = " (min-max)" if len(seeds) > 1 else ""
    over = ", ".join(map(str, seeds))
    lines = [
        f"\nheld-out accuracy, avg@{k} at the validation temperature; mean{spread} over seeds {over}\n",
        "| variant | step | " + " | ".join(sources) + " | mean |",
        "|---|---:|" + "---:|" * (len(sources) + 1),
    ]
    base = next(iter(curves.values()))[0]
    lines.append("| base model | 0 | " + " | ".join(f"{base[s][0]:.3f}" for s in [*sources, "mean"]) + " |")
    lines.append(
        "| (most common answer) | | " + " | ".join(f"{floors.get(s, 0.0):.3f}" for s in [*sources, "mean"]) + " |"
    )
    for name, steps in curves.items():
        step = max(steps)
        cells = [_spread(steps[step][s]) if s in steps[step] else "n/a" for s in [*sources, "mean"]]
        lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict[str, dict[int, object]]) -> str:
    """One line: LUFFY's lead over GRPO in mean held-out accuracy at the last step, per seed."""
    if "luffy" not in results or "grpo" not in results:
        return "verdict: needs both luffy and grpo in --modes"
    leads = {}
    for seed, luffy in results["luffy"].items():
        grpo = results["grpo"].get(seed)
        if grpo is not None and luffy.validation is not None and grpo.validation is not None:
            key = f"avg@{luffy.validation.k}"
            leads[seed] = luffy.validation.mean[key] - grpo.validation.mean[key]
    if not leads:
        return "verdict: no validation results to compare"
    word = "ahead of" if all(lead > 0 for lead in leads.values()) else "NOT ahead of"
    per_seed = ", ".join(f"{lead:+.3f} (seed {seed})" for seed, lead in leads.items())
    return f"verdict: LUFFY {word} GRPO on held-out accuracy on every seed: lead {per_seed}"


def plot_curves(curves: dict[str, dict[int, dict[str, list[float]]]], seeds: list[int], k: int, path: Path) -> Path:
    """Mean held-out accuracy against training step, one line per variant with its min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, steps in curves.items():
        xs = list(steps)
        values = [steps[x]["mean"] for x in xs]
        mean_line = [sum(v) / len(v) for v in values]
        (line,) = ax.plot(xs, mean_line, marker="o", label=VARIANTS[name].label)
        if len(seeds) > 1:
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out accuracy (avg@{k}, mean of the benchmarks)")
    spread = f"mean and min-max over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    ax.set_title(f"luffy quickstart: {spread}", fontsize=10)
    ax.set_ylim(-0.02, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_comparison(config_path: str, results: dict, curves: dict, table: str, seeds: list[int], figure: Path | None):
    """An MLflow run `quickstart-comparison` holding the table, the figure and the per-variant curves (mean, min,
    max over seeds); every trained run is nested under it."""
    from luffy_trainer.tracking import MlflowTracker

    tracking = load_config(config_path).tracking.model_copy(
        update={"run_name": "quickstart-comparison", "system_metrics": False}
    )
    tracker = MlflowTracker(tracking)
    run_id = tracker.start({"quickstart.variants": ",".join(results), "quickstart.seeds": ",".join(map(str, seeds))})
    status = "FAILED"
    try:
        for name, steps in curves.items():
            for step, at in steps.items():
                values = at["mean"]
                tracker.log_metrics(
                    step,
                    {
                        f"heldout/{name}/mean": sum(values) / len(values),
                        f"heldout/{name}/min": min(values),
                        f"heldout/{name}/max": max(values),
                    },
                )
        tracker.log_text(table, "comparison.md")
        if figure is not None:
            tracker.log_artifact(figure)
        tracker.nest([r.run_id for by_seed in results.values() for r in by_seed.values() if r.run_id])
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return run_id


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    base_model = prepare(workdir, args.base_config, args.overrides_base)
    base = base_scores(args.config, workdir)
    print(
        f"base model on {base['problems']} training problems, sampled as rollouts are: "
        f"pass@1 {100 * base['pass@1']:.2f}%, pass@{BASE_SAMPLES} {100 * base[f'pass@{BASE_SAMPLES}']:.2f}%; "
        f"held-out accuracy {base['heldout']['mean']:.3f}"
    )
    if args.prepare_only:
        print(f"base model ready: {base_model}")
        return 0
    results: dict[str, dict[int, object]] = {}
    for name in args.modes:
        for seed in args.seeds:
            log.info("quickstart: training %s with seed %d", name, seed)
            results.setdefault(name, {})[seed] = run_variant(args.config, workdir, name, seed, args.overrides)
    curves = held_out_curves(results, base["heldout"])
    k = next(r.validation.k for by_seed in results.values() for r in by_seed.values() if r.validation)
    table = comparison_table(curves, args.seeds, k, answer_floors(workdir))
    figure = plot_curves(curves, args.seeds, k, Path(args.plot)) if args.plot else None
    run_id = log_comparison(args.config, results, curves, table, args.seeds, figure)
    print(table)
    if figure is not None:
        print(f"\nlearning curves: {figure}")
    print(f"MLflow: the comparison is run {run_id} of experiment {load_config(args.config).tracking.experiment_name}")
    print(
        "See the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"
    )
    print(verdict(results))
    return 0
