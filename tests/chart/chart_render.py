"""The chart as Helm renders it: every case of chart_cases installed once per test session (helm_render.py in the
Python 3.12 venv), and small readers of the rendered objects.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_cases import INVALID, NAMESPACE, VALID

REPO = Path(__file__).resolve().parents[2]
# The operator tests' helpers (kmock shim, harness, LuffyRun samples) serve these tests too.
sys.path.insert(0, str(REPO / "tests" / "operator"))
CHART = REPO / "charts" / "luffy"
CRD_FILE = REPO / "crds" / "luffyruns.luffy.dev.yaml"
RENDER_SCRIPT = Path(__file__).with_name("helm_render.py")
# The side venv `make chart-venv` creates; LUFFY_HELM_PYTHON may point at another Python >= 3.12 with helm-sdkpy.
HELM_PYTHON = Path(os.environ.get("LUFFY_HELM_PYTHON", REPO / ".venv312" / "bin" / "python"))
# A template that Helm cannot render: the lint negative control.
BROKEN_TEMPLATE = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ nosuchfunction }}\n"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    lint: Obj  # Helm's lint result for the chart
    broken_lint: Obj  # ... for a copy of the chart with BROKEN_TEMPLATE added
    objects: dict[str, list[Obj]]  # release -> rendered objects, for the VALID cases that rendered
    notes: dict[str, str]  # release -> rendered NOTES.txt
    archive_members: dict[str, bool]  # `helm package` archive: member name -> is a regular file
    packaged_objects: list[Obj]  # that archive installed as release `luffy` with default values
    errors: dict[str, str]  # release -> Helm's error, for every case that did not


@functools.cache
def render_all() -> Rendered:
    """Lint the chart and install every case (one Helm process for all; a few seconds)."""
    if not HELM_PYTHON.exists():
        pytest.fail(
            f"{HELM_PYTHON} does not exist: the chart tests run Helm through helm-sdkpy in a Python 3.12 venv. "
            "Create it with `make chart-venv` (make test does), or set LUFFY_HELM_PYTHON."
        )
    cases = [{"release": name, "values": values} for name, values in VALID.items()]
    cases += [{"release": name, "values": values} for name, (values, _) in INVALID.items()]
    with tempfile.TemporaryDirectory(prefix="luffy-helm-") as tmp:
        work = Path(tmp)
        broken = work / "broken" / "luffy"
        shutil.copytree(CHART, broken)  # links resolved: the copy stands alone
        (broken / "templates" / "broken.yaml").write_text(BROKEN_TEMPLATE)
        request = {
            "chart": str(CHART),
            "lint": [str(CHART), str(broken)],
            "namespace": NAMESPACE,
            "cases": cases,
            "package_dir": str(work),
        }
        (work / "request.json").write_text(json.dumps(request))
        env = {
            **os.environ,
            "HELM_DRIVER": "memory",
            "HELM_CACHE_HOME": str(work / "cache"),
            "HELM_CONFIG_HOME": str(work / "config"),
            "HELM_DATA_HOME": str(work / "data"),
        }
        proc = subprocess.run(
            [str(HELM_PYTHON), str(RENDER_SCRIPT), str(work / "request.json"), str(work / "result.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"helm_render.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((work / "result.json").read_text())
        with tarfile.open(result["package"]["archive"]) as archive:
            members = {m.name: m.isfile() for m in archive.getmembers()}
    objects = {
        name: [o for o in yaml.safe_load_all(out["manifest"]) if o]
        for name, out in result["cases"].items()
        if "manifest" in out
    }
    notes = {name: out["notes"] for name, out in result["cases"].items() if "notes" in out}
    errors = {name: out["error"] for name, out in result["cases"].items() if "error" in out}
    packaged = [o for o in yaml.safe_load_all(result["package"]["luffy"]["manifest"]) if o]
    return Rendered(result["lint"][str(CHART)], result["lint"][str(broken)], objects, notes, members, packaged, errors)


def release_objects(release: str) -> list[Obj]:
    rendered = render_all()
    if release not in rendered.objects:
        pytest.fail(f"release {release} did not render: {rendered.errors.get(release)}")
    return rendered.objects[release]


def fullname(release: str) -> str:
    """The chart's luffy.fullname for a case: the override, else the release (+ "-luffy" unless it has it)."""
    return VALID[release].get("fullnameOverride") or (release if "luffy" in release else f"{release}-luffy")


def find(objects: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> list[Obj]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and name in (None, o["metadata"]["name"])
        and namespace in (None, o["metadata"].get("namespace"))
    ]


def one(objects: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> Obj:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def env_of(container: Obj) -> dict[str, Obj]:
    """name -> the EnvVar object."""
    return {e["name"]: e for e in container.get("env", [])}
