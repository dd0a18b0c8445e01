"""The `luffy` command line.

Every subcommand's arguments are declared here; its implementation is imported only when it runs, so building the
parser imports no torch. The operator has its own command, `luffy-operator` (luffy_operator.cli).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from luffy_trainer.contract import ROLLOUT_PORT

# subcommand -> "module:function" taking the parsed argparse.Namespace and returning an exit code.
COMMANDS: dict[str, str] = {}


def _command(name: str, target: str, help_text: str, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    COMMANDS[name] = target
    return sub.add_parser(name, help=help_text, description=help_text)


def _config_arguments(p: argparse.ArgumentParser, config_help: str, example: str, optional: bool = False) -> None:
    """A YAML config and `--set` overrides of its fields, read by `config.load_config` for every command alike."""
    p.add_argument("config", nargs="?" if optional else None, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field by dotted path, e.g. --set {example} (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    from luffy_trainer.demo.quickstart import VARIANTS as QUICKSTART_VARIANTS  # torch-free, like this module

    parser = argparse.ArgumentParser(
        prog="luffy", description="LUFFY training of reasoning LLMs, local or on Kubernetes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command("train", "luffy_trainer.train:main", "Train a model with LUFFY (or a baseline) from a config.", sub)
    _config_arguments(p, "YAML config (see examples/)", "algorithm.mode=grpo")
    p.add_argument("--resume", action="store_true", help="require resuming from the newest checkpoint")

    p = _command(
        "quickstart",
        "luffy_trainer.demo.quickstart:main",
        "Build the tiny model and arithmetic task, then train on them (what `make run` runs).",
        sub,
    )
    p.add_argument("--workdir", default="runs/quickstart", help="where the model, data and outputs go")
    p.add_argument("--config", default="examples/quickstart.yaml", help="the config of the compared runs")
    p.add_argument(
        "--base-config", default=None, help="the base model config (default: luffy_trainer/demo/quickstart_base.yaml)"
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
        "luffy_trainer.demo.tiny:main",
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
    )
    _config_arguments(
        p,
        "YAML eval config (see examples/eval-paper-math.yaml); without one, the fields come from --set alone",
        "model.path=outputs/final",
        optional=True,
    )

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
    p.add_argument(
        "--control-token-file",
        default=None,
        help="file with the run's control token: every route but /health then needs `Authorization: Bearer <token>`",
    )
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
    from luffy_trainer.config import UserError

    try:
        return int(_resolve(COMMANDS[args.command])(args) or 0)
    except UserError as exc:
        print(f"luffy {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"luffy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
