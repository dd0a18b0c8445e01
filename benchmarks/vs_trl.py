"""luffy against TRL's GRPOTrainer on one fixed GRPO setup: seconds per step, generation, the rest, peak memory.

The setup (both sides): 8 prompts x 8 samples per step, exactly 128 completion tokens per sample, one optimizer step
per batch, float32, no gradient checkpointing, AdamW at lr 1e-5 (constant, no weight decay, grad clip 1.0), PPO clip
0.2, token-mean loss over the batch, no KL, no entropy term, no std scaling of advantages; a 3.4M-parameter Qwen2
(hidden 256, 4 layers, MLP 768, vocab 448) with random weights and the project's tiny tokenizer, built here. luffy
runs `grpo` mode with in-process vLLM (its own `luffy train` loop, MLflow tracking to a local store, the reward
pool); TRL 1.16 runs GRPOTrainer with `transformers` generate, in its own environment (`make trl-venv`, .venvtrl).

- **128 tokens, forced the same way on both sides**: the benchmark's model cannot sample EOS. One residual dimension
  is held constant (every token embedding carries +1 there and no attention or MLP output writes to it), so after the
  final norm it is a large positive number, and EOS's lm_head row is -1e4 on that dimension and 0 elsewhere: EOS's
  logit is about -1e5. No sampling setting differs between the two sides.
- **Reward**: the same cheap rule on both sides (the fraction of digits in the decoded completion), so grading is
  never the bottleneck; luffy grades it in its reward pool, TRL in its process.
- **Measurement**: every run is a fresh process; variants are interleaved (A B C A B C ...), `--runs` each. A step's
  time is the wall time between the ends of consecutive steps (luffy: MLflow's timestamps of the step metrics, which
  are logged after everything else of the step; TRL: `on_step_end`), over `--steps` steps after `--warmup` steps.
  Generation is luffy's `time/generate_s` and TRL's own `transformers.generate` timer; the rest is step minus
  generation. Peak RSS is the high-water mark of the sum of RSS over the run's process tree (its reward workers
  included), sampled every 200 ms; start-up time is from process start to the end of the first step.

    .venv/bin/python -P benchmarks/vs_trl.py                     # luffy, luffy k=1, TRL; 3 runs each
    .venv/bin/python -P benchmarks/vs_trl.py --variants luffy trl --runs 5
    .venv/bin/python -P benchmarks/vs_trl.py --luffy-variant before=/tmp/luffy-before/trainer
    .venv/bin/python -P benchmarks/vs_trl.py --luffy-variant nobind=trainer --set nobind:tracking.systemMetrics=false

A luffy variant is NAME=TRAINER_SOURCE_DIR (put first on PYTHONPATH), with optional `--set NAME:key=value`
overrides; `luffy-async` is `--set rollout.maxStaleness=1` on the working tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, SAMPLES, COMPLETION_TOKENS = 8, 8, 128
LR, CLIP, SEED = 1e-5, 0.2, 7
SHAPE = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768, num_hidden_layers=4,
    vocab_size=448,
)  # fmt: skip
EOS_LOGIT_WEIGHT = -1e4
REWARD = "vs_trl_digit_fraction"


def digit_fraction(response: str, ground_truth: str) -> float:
    """The benchmark's reward on both sides: cheap, never the bottleneck, and it varies within a group."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


# --- the setup, built once per benchmark (luffy's .venv) -------------------------------------------------------------


def build_setup(directory: Path) -> dict:
    """The model (EOS unreachable), the luffy parquet and the same prompts as chat messages for TRL."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from luffy_trainer.demo.tasks import arithmetic_rows
    from luffy_trainer.demo.tiny import TinyModelShape, build_model, build_tokenizer

    shape = TinyModelShape(**SHAPE)
    tokenizer = build_tokenizer(shape)
    model = build_model(tokenizer, shape, seed=SEED)
    with torch.no_grad():
        # Dimension 0 of the residual stream is a constant +1: set in every embedding, written by no layer.
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = EOS_LOGIT_WEIGHT
    model_dir = directory / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    rows = arithmetic_rows(0, 64, seed=SEED)["train"]
    pq.write_table(pa.Table.from_pylist(rows), directory / "train.parquet")
    (directory / "prompts.json").write_text(json.dumps([r["prompt"] for r in rows]))
    return {"parameters": sum(p.numel() for p in model.parameters()), "model": str(model_dir)}


# --- one luffy run (a fresh process in .venv) ------------------------------------------------------------------------


def luffy_config(setup: Path, workdir: Path, steps: int) -> dict:
    return {
        "model": {"path": str(setup / "model"), "dtype": "float32", "gradientCheckpointing": False},
        "data": {
            "trainFiles": [str(setup / "train.parquet")],
            "maxPromptLength": 64,
            "maxResponseLength": COMPLETION_TOKENS,
        },
        "algorithm": {
            "mode": "grpo", "nOnPolicy": SAMPLES, "clipEps": CLIP, "aggregation": "token-mean",
            "lossScale": "invariant", "entropyCoeff": 0.0, "normalizeStd": False,
        },
        "reward": {"name": REWARD},
        "rollout": {"backend": "vllm", "temperature": 1.0, "maxModelLen": 64 + COMPLETION_TOKENS},
        "optimization": {
            "lr": LR, "weightDecay": 0.0, "gradClip": 1.0, "warmupSteps": 0, "promptsPerStep": PROMPTS,
            "optimizerStepsPerBatch": 1, "totalSteps": steps, "seed": SEED,
        },
        "checkpoint": {"dir": str(workdir / "checkpoints"), "everySteps": steps},
        "tracking": {"experimentName": "vs-trl", "logModel": False},
        "outputDir": str(workdir / "outputs"),
    }  # fmt: skip


def run_luffy(setup: Path, workdir: Path, steps: int, overrides: list[str]) -> dict:
    import yaml
    from luffy_trainer.config import load_config
    from luffy_trainer.rewards import register_reward
    from luffy_trainer.train import LuffyTrainer
    from mlflow.tracking import MlflowClient

    register_reward(REWARD)(digit_fraction)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(luffy_config(setup, workdir, steps)))
    result = LuffyTrainer(load_config(config_path, overrides), workdir=workdir).run()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def history(key: str) -> list:
        return sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)

    parts = {k: [m.value for m in history(f"time/{k}")] for k in ("train_s", "reward_s", "weight_sync_s", "step_s")}
    return {
        "step_ends": [m.timestamp / 1000 for m in history("time/step_s")],
        "generate_s": [m.value for m in history("time/generate_s")],
        "tokens_per_sample": [m.value for m in history("response_length/on_policy_mean")],
        "parts": parts,
    }


# --- one TRL run (a fresh process in .venvtrl) -----------------------------------------------------------------------


def run_trl(setup: Path, workdir: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    generate_s: list[float] = []
    record = profiling.ProfilingContext._log_metrics

    def timed(self, duration: float) -> None:  # TRL's own timer around generate, also kept here
        if self.name.endswith(".transformers.generate"):
            generate_s.append(duration)
        record(self, duration)

    profiling.ProfilingContext._log_metrics = timed
    step_ends: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def reward(completions, **kwargs) -> list[float]:
        return [digit_fraction(c[0]["content"] if isinstance(c, list) else c, "") for c in completions]

    reward.__name__ = REWARD
    prompts = json.loads((setup / "prompts.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    args = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
        num_generations=SAMPLES, max_completion_length=COMPLETION_TOKENS, steps_per_generation=1, num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=CLIP, loss_type="bnpo", scale_rewards="none", temperature=1.0, top_p=1.0,
        max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=SEED, data_seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    return {"step_ends": step_ends, "generate_s": generate_s, "tokens_per_sample": lengths}


# --- the interleaved benchmark (luffy's .venv) -----------------------------------------------------------------------


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS of the process tree (summed) and of the process itself, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        main = root.memory_info().rss
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total, main


def launch(variant: dict, setup: Path, steps: int, log_dir: Path, index: int) -> dict:
    """One fresh-process run; returns its raw result with peak tree RSS and wall time."""
    workdir = Path(tempfile.mkdtemp(prefix=f"vs-trl-{variant['name']}-", dir=log_dir))
    out = workdir / "result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("MLFLOW_TRACKING_URI", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS"):  # each side's own defaults
        env.pop(name, None)
    if variant["kind"] == "trl":
        python = ROOT / ".venvtrl" / "bin" / "python"
        env["PYTHONPATH"] = ""
        cmd = [str(python), "-P", __file__, "_trl", str(setup), str(workdir), str(steps), str(out)]
    else:
        python = ROOT / ".venv" / "bin" / "python"
        env["PYTHONPATH"] = str(variant["src"])
        cmd = [str(python), "-P", __file__, "_luffy", str(setup), str(workdir), str(steps), str(out)]
        cmd += [f"--set={o}" for o in variant["overrides"]]
    start = time.time()
    with open(workdir / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        peak = peak_main = 0
        while proc.poll() is None:
            tree, main = tree_rss(proc.pid)
            peak, peak_main = max(peak, tree), max(peak_main, main)
            time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{variant['name']} run {index} failed (exit {proc.returncode}); log: {workdir / 'log.txt'}")
    result = json.loads(out.read_text())
    result.update(peak_rss=peak, peak_main_rss=peak_main, start=start, log=str(workdir / "log.txt"))
    return result


def summarize(result: dict, warmup: int) -> dict:
    """Per-run numbers over the measured steps (after `warmup`)."""
    ends, gen = result["step_ends"], result["generate_s"]
    steps = len(ends) - warmup
    step_s = (ends[-1] - ends[warmup - 1]) / steps
    gen_steps = gen[warmup:]
    tokens = PROMPTS * SAMPLES * statistics.mean(result["tokens_per_sample"][warmup:])
    gen_s = statistics.mean(gen_steps)
    parts = {f"{k}_mean": statistics.mean(v[warmup:]) for k, v in result.get("parts", {}).items()}
    return {
        **parts,
        "step_s": step_s,
        "gen_per_8192_s": gen_s * 8192 / tokens,
        "rest_s": step_s - gen_s,
        "tokens_per_step": tokens,
        "peak_rss_gib": result["peak_rss"] / 2**30,
        "peak_main_rss_gib": result["peak_main_rss"] / 2**30,
        "first_step_s": ends[0] - result["start"],
    }


def machine() -> str:
    import torch
    import vllm

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    versions = "import trl, transformers; print(trl.__version__, transformers.__version__)"
    trl = subprocess.run(
        [str(ROOT / ".venvtrl/bin/python"), "-c", versions], capture_output=True, text=True, check=True
    ).stdout.split()
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GB RAM; Python {platform.python_version()}, torch "
        f"{torch.__version__}, vllm {vllm.__version__}; TRL {trl[0]} with transformers {trl[1]}"
    )


def parse_variants(args: argparse.Namespace) -> list[dict]:
    here = ROOT / "trainer"
    known = {
        "luffy": {"kind": "luffy", "src": here, "overrides": []},
        "luffy-async": {"kind": "luffy", "src": here, "overrides": ["rollout.maxStaleness=1"]},
        "trl": {"kind": "trl"},
    }
    for spec in args.luffy_variant:
        name, _, src = spec.partition("=")
        known[name] = {"kind": "luffy", "src": Path(src).resolve(), "overrides": []}
        if name not in args.variants:
            args.variants.append(name)
    for spec in args.set:
        name, _, override = spec.partition(":")
        if name not in known or known[name]["kind"] != "luffy" or not override:
            raise SystemExit(f"--set {spec!r}: expected LUFFY_VARIANT:key=value with a luffy variant")
        known[name]["overrides"].append(override)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return [dict(known[v], name=v) for v in args.variants]


def benchmark(args: argparse.Namespace) -> None:
    variants = parse_variants(args)
    log_dir = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    setup = log_dir / "setup"
    setup.mkdir()
    info = build_setup(setup)
    print(f"# {machine()}\n# model: {info['parameters'] / 1e6:.2f}M parameters; runs under {log_dir}", flush=True)
    total = args.warmup + args.steps
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for i in range(args.runs):
        for v in variants:
            load = os.getloadavg()[0]
            result = summarize(launch(v, setup, total, log_dir, i), args.warmup)
            result["load"] = load
            runs[v["name"]].append(result)
            print(f"{v['name']} run {i + 1}: " + json.dumps({k: round(x, 3) for k, x in result.items()}), flush=True)
    keys = ["step_s", "gen_per_8192_s", "rest_s", "peak_rss_gib", "peak_main_rss_gib", "first_step_s"]
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    base = med.get("trl")
    print("\n| variant | s/step | steps/s vs TRL | generation per 8,192 tokens (s) | rest of step (s) | peak RSS (GiB) "
          "| of which the main process | start to end of step 1 (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        ratio = f"{base['step_s'] / m['step_s']:.2f}x" if base else "-"
        print(
            f"| {name} | {m['step_s']:.2f} | {ratio} | {m['gen_per_8192_s']:.2f} | {m['rest_s']:.2f} | "
            f"{m['peak_rss_gib']:.2f} | {m['peak_main_rss_gib']:.2f} | {m['first_step_s']:.1f} |"
        )
    print(f"\nmedians of {args.runs} interleaved fresh-process runs, {args.steps} steps after {args.warmup} warm-up; "
          f"load average at run starts {min(r['load'] for rs in runs.values() for r in rs):.1f}-"
          f"{max(r['load'] for rs in runs.values() for r in rs):.1f}")  # fmt: skip
    (log_dir / "summary.json").write_text(json.dumps({"runs": runs, "medians": med}, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_luffy", "_trl"):
        role, setup, workdir, steps, out = sys.argv[1:6]
        overrides = [a.removeprefix("--set=") for a in sys.argv[6:]]
        if role == "_luffy":
            result = run_luffy(Path(setup), Path(workdir), int(steps), overrides)
        else:
            result = run_trl(Path(setup), Path(workdir), int(steps))
        Path(out).write_text(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["luffy", "luffy-async", "trl"])
    parser.add_argument("--luffy-variant", action="append", default=[], help="NAME=TRAINER_SOURCE_DIR")
    parser.add_argument("--set", action="append", default=[], help="LUFFY_VARIANT:key=value")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    benchmark(parser.parse_args())


if __name__ == "__main__":
    main()
