"""The operator side must work without torch: the operator image installs neither torch nor vLLM."""

from __future__ import annotations

import subprocess
import sys

# A child interpreter in which torch, vllm, transformers and mlflow cannot be imported at all.
_BLOCK_HEAVY = """
import sys
for name in ("torch", "vllm", "transformers", "mlflow", "safetensors"):
    sys.modules[name] = None  # makes `import name` raise ImportError
"""


def _run_without_heavy_packages(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_HEAVY + code], capture_output=True, text=True, timeout=120, check=False
    )


def test_blocking_really_prevents_torch_import():
    proc = _run_without_heavy_packages("import torch")
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_operator_and_config_import_without_torch():
    code = """
import importlib, pkgutil
import luffy_trainer, luffy_trainer.config, luffy_trainer.cli
import luffy_operator
for mod in pkgutil.walk_packages(luffy_operator.__path__, "luffy_operator."):
    importlib.import_module(mod.name)
luffy_trainer.cli.build_parser().parse_args(["crd"])
print("ok")
"""
    proc = _run_without_heavy_packages(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
