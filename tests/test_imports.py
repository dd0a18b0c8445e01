"""The operator side must work without torch (the operator image installs neither torch nor vLLM), and the trainer
never imports the operator: the two meet only in `luffy_trainer.contract` and the config models."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1] / "trainer"
TRAINER_FILES = sorted(TRAINER.rglob("*.py"))

# A child interpreter in which torch, vllm, transformers and mlflow cannot be imported at all.
_BLOCK_HEAVY = """
import sys
for name in ("torch", "vllm", "transformers", "mlflow", "safetensors"):
    sys.modules[name] = None  # makes `import name` raise ImportError
"""


def _run(code: str, block_heavy: bool = True) -> subprocess.CompletedProcess:
    prelude = _BLOCK_HEAVY if block_heavy else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300, check=False
    )


def test_blocking_really_prevents_torch_import():
    proc = _run("import torch")
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_operator_and_config_import_without_torch():
    code = """
import importlib, pkgutil
import luffy_trainer, luffy_trainer.config, luffy_trainer.contract, luffy_trainer.cli
import luffy_operator, luffy_operator.cli
for mod in pkgutil.walk_packages(luffy_operator.__path__, "luffy_operator."):
    importlib.import_module(mod.name)
luffy_operator.cli.build_parser().parse_args(["crd"])
luffy_trainer.cli.build_parser().parse_args(["train", "run.yaml"])
print("ok")
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an `import` or `from ... import` names, anywhere in the file (function bodies included)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", TRAINER_FILES, ids=lambda p: str(p.relative_to(TRAINER)))
def test_no_trainer_module_imports_the_operator(path: Path):
    imported = _imported_modules(ast.parse(path.read_text(), filename=str(path)))
    assert not {m for m in imported if m.split(".")[0] == "luffy_operator"}, f"{path} imports luffy_operator"


def test_the_ast_check_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from luffy_operator.api import GROUP\n    import luffy_operator.crd as c\n")
    assert _imported_modules(tree) == {"luffy_operator.api", "luffy_operator.crd"}


def test_importing_every_trainer_module_loads_no_operator_module():
    """Dynamic imports (importlib, `module:function` strings) are caught here, where the AST cannot see them."""
    code = """
import importlib, pkgutil, sys
import luffy_trainer
from luffy_trainer import cli
cli.build_parser()  # fills cli.COMMANDS
for mod in pkgutil.walk_packages(luffy_trainer.__path__, "luffy_trainer."):
    importlib.import_module(mod.name)
for target in cli.COMMANDS.values():
    importlib.import_module(target.partition(":")[0])
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "luffy_operator")
print("loaded:", loaded)
"""
    proc = _run(code, block_heavy=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"
