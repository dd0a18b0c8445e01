"""The `luffy` command line.

Every subcommand's arguments are declared here; its implementation is imported only when it runs, so building the
parser imports no torch. The operator has its own command, `luffy-operator` (luffy_operator.cli).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Callable

from luffy_trainer.contract import ROLLOUT_PORT

# subcommand -> "module:function" taking the parsed argparse.Namespace and returning an exit code.
COMMANDS: dict[str, str] = {}


def _recipe_line(line: str) -> list[str]:
    """One line of an `@FILE` recipe: any number of shell-quoted arguments; `#` starts a comment."""
    return shlex.split(line, comments=True)


def _command(
    name: str, target: str, help_text: str, sub: argparse._SubParsersAction, recipe_files: bool = False
) -> argparse.ArgumentParser:
    COMMANDS[name] = target
    if not recipe_files:
        return sub.add_parser(name, help=help_text, description=help_text)
    parser = sub.add_parser(
        name,
        help=help_text,
        description=f"{help_text} Arguments may also come from a file: @FILE.",
        fromfile_prefix_chars="@",
    )
    parser.convert_arg_line_to_args = _recipe_line
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from luffy_trainer.quickstart import VARIANTS as QUICKSTART_VARIANTS  # torch-free, like this module

    parser = argparse.ArgumentParser(
        prog="luffy", description="LUFFY training of reasoning LLMs, local or on Kubernetes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command("train", "luffy_trainer.train:main", "Train a model with LUFFY (or a baseline) from a config.", sub)
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set algorithm.mode=grpo (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="require resuming from the newest checkpoint")

    p = _command(
        "quickstart",
        "luffy_trainer.quickstart:main",
        "Build the tiny model and arithmetic task, then train on them (what `make run` runs).",
        sub,
    )
    p.add_argument("--workdir", default="runs/quickstart", help="where the model, data and outputs go")
    p.add_argument("--config", default="examples/quickstart.yaml", help="the config of the compared runs")
    p.add_argument(
        "--base-config", default=None, help="the config of the base model (default: luffy_trainer/quickstart_base.yaml)"
    )
    p.add_argument("--prepare-only", action="store_true", help="build model, data and base model, train nothing")
    p.add_argument(
        "--set-base",
        dest="overrides_base",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base-model config",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["luffy", "grpo"],
        choices=list(QUICKSTART_VARIANTS),
        help="variants to train and compare, each with the same step budget",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[1], help="train every variant once per seed (optimization.seed)"
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="draw the held-out learning curves here (and log them to MLflow)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = _command(
        "make-tiny-model",
        "luffy_trainer.tiny:main",
        "Write a deterministic tiny Qwen2-style model and tokenizer (nothing downloaded).",
        sub,
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")

    p = _command(
        "eval",
        "luffy_trainer.eval_cli:main",
        "Score a model on local benchmark files: avg@k and pass@k per benchmark, as LUFFY evaluates.",
        sub,
        recipe_files=True,
    )
    p.add_argument("--model", required=True, help="model directory (its tokenizer and chat template are used)")
    p.add_argument(
        "--benchmark", action="append", required=True, metavar="FILE", help="parquet/JSONL file (repeatable)"
    )
    p.add_argument(
        "--format", choices=["luffy", "flat"], default="luffy", help="luffy: released LUFFY schema; flat: columns"
    )
    p.add_argument(
        "--data-source",
        action="append",
        default=[],
        metavar="NAME",
        help="benchmark name of each --benchmark file, in order (default: its data_source column, else the file name)",
    )
    p.add_argument("--question-column", default="question", help="flat format: the problem column")
    p.add_argument("--answer-column", default="answer", help="flat format: the ground-truth column")
    p.add_argument("--keep-system-prompt", action="store_true", help="keep system messages (LUFFY removes them)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N problems per benchmark")
    p.add_argument(
        "--samples",
        "-k",
        action="append",
        default=[],
        metavar="[BENCHMARK=]K",
        help="samples per problem (avg@k, pass@k), for every (or one) benchmark; default 1",
    )
    p.add_argument(
        "--distinct",
        action="store_true",
        help="keep one row per distinct problem (LUFFY's released files repeat AIME/AMC rows 32 times)",
    )
    p.add_argument(
        "--pass-at", type=_positive_int, action="append", default=[], metavar="J", help="also report pass@J (J < k)"
    )
    p.add_argument("--temperature", type=_non_negative_float, default=0.6, help="sampling temperature")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-tokens", type=_positive_int, default=8192, help="longest answer, in tokens")
    p.add_argument("--max-prompt-length", type=_positive_int, default=1024, help="longest templated prompt")
    p.add_argument("--seed", type=int, default=47, help="sampling seed")
    p.add_argument(
        "--grader",
        action="append",
        default=[],
        metavar="[BENCHMARK=]REWARD",
        help="grade every (or one) benchmark with a registered reward; default: math_verify, multiple_choice for "
        "ARC-c/GPQA/MMLU-Pro and option-letter answers",
    )
    p.add_argument("--grader-workers", type=_positive_int, default=4, help="grading processes")
    p.add_argument("--grade-timeout", type=float, default=10.0, help="seconds one sample may take to grade")
    p.add_argument("--backend", choices=["vllm", "hf", "vllm-server"], default="vllm", help="generation backend")
    p.add_argument(
        "--server-url", action="append", default=[], metavar="URL", help="vllm-server backend: a `luffy serve-rollout`"
    )
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="weight dtype")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's custom code")
    p.add_argument("--tensor-parallel-size", type=_positive_int, default=1, help="GPUs per vLLM engine")
    p.add_argument("--gpu-memory-utilization", type=_probability, default=0.9, help="vLLM's share of GPU memory")
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="vLLM context (default prompt + answer)")
    p.add_argument(
        "--enforce-eager", action=argparse.BooleanOptionalAction, default=True, help="vLLM without CUDA graphs"
    )
    p.add_argument("--output", default="eval_results", help="directory of results.json, results.md, generations")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (MLFLOW_TRACKING_URI also enables logging)")
    p.add_argument("--experiment", default="luffy-eval", help="MLflow experiment of a new run")
    p.add_argument("--run-name", default=None, help="MLflow run name of a new run")
    p.add_argument("--run-id", default=None, help="log into this existing MLflow run (e.g. the training run)")
    p.add_argument("--step", type=int, default=0, help="MLflow step of the metrics (the checkpoint's training step)")

    p = _command(
        "serve-rollout",
        "luffy_trainer.rollout.serve:main",
        "Start a vLLM rollout server with luffy's weight-sync extension.",
        sub,
    )
    p.add_argument("--model", required=True, help="model directory (or a Hugging Face id resolvable offline)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=ROLLOUT_PORT, help="HTTP port")
    p.add_argument("--dtype", default="auto", help="weight dtype (float32 on CPU CI, bfloat16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + response)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="fraction of GPU memory vLLM may use")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (fast start)")
    p.add_argument("--served-model-name", default="policy", help="model name in the OpenAI API")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra arguments passed to vLLM after `--`")

    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from luffy_trainer.config import ConfigError

    try:
        return int(_resolve(COMMANDS[args.command])(args) or 0)
    except ConfigError as exc:
        print(f"luffy {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"luffy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
