"""The Dockerfile, parsed by BuildKit's own parser (the `dockerfile` package): stages, users, entry points, labels,
build arguments in scope and in step with pyproject.toml and the chart, no secrets, no torch in the operator image.

No Docker engine runs here, so the images are never built in the tests; this is what can be checked without one.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import yaml
from luffy_operator.manifests import RUN_AS_USER
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CHART_VALUES = yaml.safe_load((REPO / "charts" / "luffy" / "values.yaml").read_text())
CHART = yaml.safe_load((REPO / "charts" / "luffy" / "Chart.yaml").read_text())
OCI_LABELS = {"title", "description", "version", "revision", "created", "licenses", "base.name"}
HEAVY = ("torch", "vllm", "transformers", "mlflow", "safetensors")
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_KEY", re.IGNORECASE)
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Stage:
    name: str
    base: str
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def last(self, cmd: str) -> dockerfile.Command:
        found = self.all(cmd)
        assert found, f"stage {self.name} has no {cmd}"
        return found[-1]

    def pairs(self, cmd: str) -> dict[str, str]:
        """KEY=VALUE instructions (LABEL, ENV) as a dict, quotes removed."""
        out = {}
        for c in self.all(cmd):
            values = list(c.value)
            out.update({k: v.strip('"') for k, v in zip(values[::2], values[1::2], strict=True)})
        return out

    def args(self) -> dict[str, str | None]:
        out = {}
        for c in self.all("ARG"):
            for item in c.value:
                name, _, default = item.partition("=")
                out[name] = default.strip('"') if "=" in item else None
        return out

    def run_text(self) -> str:
        return "\n".join(" ".join(c.value) for c in self.all("RUN"))


COMMANDS = dockerfile.parse_file(str(REPO / "Dockerfile"))
GLOBAL_ARGS = Stage("(global)", "")
STAGES: dict[str, Stage] = {}
for command in COMMANDS:
    if command.cmd == "FROM":
        base, _as, name = command.value
        STAGES[name] = Stage(name, base)
    elif STAGES:
        list(STAGES.values())[-1].commands.append(command)
    else:
        GLOBAL_ARGS.commands.append(command)
DEFAULTS = GLOBAL_ARGS.args()


def test_three_targets_with_the_trainer_image_as_default() -> None:
    assert list(STAGES) == ["operator", "mlflow", "trainer"]  # `docker build .` builds the last one
    assert (REPO / "Dockerfile").read_text().startswith("# syntax=docker/dockerfile:1")


def test_base_images_and_versions_are_build_arguments() -> None:
    assert {"PYTHON_VERSION", "CUDA_IMAGE", "TORCH_VERSION", "VLLM_VERSION", "MLFLOW_VERSION"} <= DEFAULTS.keys()
    assert all(value for value in DEFAULTS.values()), DEFAULTS
    for stage in STAGES.values():
        assert VARIABLE.search(stage.base), f"{stage.name}: FROM {stage.base} is not a build argument"
    assert STAGES["trainer"].base == "${CUDA_IMAGE}" and DEFAULTS["CUDA_IMAGE"].startswith("nvidia/cuda:")


@pytest.mark.parametrize("name", ["operator", "mlflow", "trainer"])
def test_every_variable_is_in_scope(name: str) -> None:
    """A global ARG is visible only to FROM lines; a stage must declare it again before it uses it."""
    stage = STAGES[name]
    declared = stage.args().keys() | stage.pairs("ENV").keys() | {"PATH"}
    for c in stage.commands:
        for variable in VARIABLE.findall(c.original):
            assert variable in declared, f"{name}: ${variable} is not declared in the stage ({c.original})"
    assert stage.args().keys() <= DEFAULTS.keys()  # every stage ARG has its default at the top


def test_versions_agree_with_pyproject_and_the_chart() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = {Requirement(r).name: Requirement(r).specifier for r in extras["trainer"] + extras["gpu"]}
    assert pins["torch"] == SpecifierSet(f"=={DEFAULTS['TORCH_VERSION']}")
    assert DEFAULTS["VLLM_VERSION"] in pins["vllm"]
    assert DEFAULTS["MLFLOW_VERSION"] in pins["mlflow"]
    assert CHART_VALUES["mlflow"]["image"]["tag"] == f"v{DEFAULTS['MLFLOW_VERSION']}"
    assert f"{DEFAULTS['PYTHON_VERSION']}.0" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert DEFAULTS["LUFFY_VERSION"] == PYPROJECT["project"]["version"] == CHART["appVersion"]


@pytest.mark.parametrize(
    ("name", "uid"),
    [
        ("operator", CHART_VALUES["operator"]["runAsUser"]),
        ("mlflow", CHART_VALUES["mlflow"]["runAsUser"]),
        ("trainer", RUN_AS_USER),  # what the operator's pods run as
    ],
)
def test_final_user_is_numeric_non_root_and_matches_the_pods(name: str, uid: int) -> None:
    user = STAGES[name].last("USER").value[0]
    assert re.fullmatch(r"[0-9]+:[0-9]+", user), f"{name}: USER {user} is not numeric (runAsNonRoot needs a uid)"
    assert int(user.split(":")[0]) == uid != 0
    # Nothing runs as root after the switch.
    assert STAGES[name].commands.index(STAGES[name].last("USER")) > max(
        STAGES[name].commands.index(c) for c in STAGES[name].all("RUN")
    )


@pytest.mark.parametrize(
    ("name", "entrypoint"),
    [("operator", ["luffy-operator", "run"]), ("mlflow", ["mlflow"]), ("trainer", ["luffy"])],
)
def test_entry_points_are_exec_form(name: str, entrypoint: list[str]) -> None:
    stage = STAGES[name]
    assert stage.last("ENTRYPOINT").json and list(stage.last("ENTRYPOINT").value) == entrypoint
    assert entrypoint[0] == "mlflow" or entrypoint[0] in PYPROJECT["project"]["scripts"]  # luffy's own commands
    assert stage.last("CMD").json


def test_operator_default_command_is_what_the_chart_runs() -> None:
    cmd = list(STAGES["operator"].last("CMD").value)
    assert cmd == ["--standalone", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert "8080" in STAGES["operator"].last("EXPOSE").value


@pytest.mark.parametrize("name", ["operator", "mlflow", "trainer"])
def test_oci_labels_and_home(name: str) -> None:
    stage = STAGES[name]
    labels = stage.pairs("LABEL")
    assert {f"org.opencontainers.image.{k}" for k in OCI_LABELS} <= labels.keys()
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.version"] == "${LUFFY_VERSION}"
    assert stage.pairs("ENV")["HOME"] == "/tmp"  # the pods' root filesystem is read-only


def test_no_secrets_and_no_remote_sources() -> None:
    assert not [c for c in COMMANDS if c.cmd == "ADD"], "ADD fetches URLs and unpacks archives: use COPY or RUN"
    for stage in [GLOBAL_ARGS, *STAGES.values()]:
        names = stage.args().keys() | stage.pairs("ENV").keys()
        assert not [n for n in names if SECRET_WORDS.search(n)], f"{stage.name}: a secret-like build arg or env"
        run = stage.run_text()
        assert not re.search(r"\b(curl|wget)\b|https?://", run), f"{stage.name} downloads outside pip/apt"
        assert "--mount=type=secret" not in " ".join(f for c in stage.all("RUN") for f in c.flags)
    assert not [c for c in COMMANDS if c.cmd == "COPY"], "the source is bind-mounted, never copied into a layer"


def test_operator_image_installs_no_torch() -> None:
    run = STAGES["operator"].run_text()
    assert run.strip().endswith('pip install "/src[operator]"')
    assert not any(word in run for word in HEAVY)
    # ... and what `.[operator]` pulls in has none of them either.
    project = PYPROJECT["project"]
    names = {Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["operator"]}
    assert not names & set(HEAVY), names


def test_trainer_image_installs_the_gpu_stack() -> None:
    run = STAGES["trainer"].run_text()
    assert '"/src[trainer,gpu]"' in run
    assert '"torch==${TORCH_VERSION}"' in run and '"vllm==${VLLM_VERSION}"' in run
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {Requirement(r).name for r in extras["trainer"] + extras["gpu"]}
    assert {"torch", "vllm", "transformers", "mlflow", "math-verify"} <= names


def test_mlflow_image_has_the_drivers_the_chart_needs() -> None:
    run = STAGES["mlflow"].run_text()
    assert '"mlflow==${MLFLOW_VERSION}"' in run and "psycopg2-binary" in run and "boto3" in run


# --- .dockerignore --------------------------------------------------------------------------------------------------

IGNORE = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Docker's rule for these patterns (no `!` exceptions here): a path is out if it or a parent matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    patterns = [p.removeprefix("**/") for p in IGNORE] + IGNORE
    return any(
        fnmatch.fnmatch(prefix, p) or fnmatch.fnmatch(parts[i], p)
        for p in patterns
        for i, prefix in enumerate(prefixes)
    )


def test_dockerignore_keeps_the_sources_and_drops_venvs_and_credentials() -> None:
    assert not [p for p in IGNORE if p.startswith("!")]
    for needed in ["pyproject.toml", "README.md", "trainer/luffy_trainer/cli.py", "operator/luffy_operator/kube.py"]:
        assert not ignored(needed), needed
    for unwanted in [
        ".venv/bin/python",
        ".venv312/bin/python",
        ".git/config",
        "mlruns/0/meta.yaml",
        ".env",
        "secrets/tls.key",
        "deploy/kubeconfig.yaml",
        "trainer/luffy_trainer/__pycache__/x.pyc",
    ]:
        assert ignored(unwanted), unwanted
