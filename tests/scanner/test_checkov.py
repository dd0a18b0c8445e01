"""A third-party scanner agrees: checkov (tests/scanner/requirements-checkov.txt, in `.venvscan`) on the chart as Helm
renders it with default values and with MLflow on, and on the children of the 7B example run. Every check passes or is
skipped for the reason tests/scanner/skips.yaml gives; a skip that matches no failure fails too, so the list stays
what is needed."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "chart"))  # the chart tests' Helm rendering (and, through it, tests/operator)

from chart_render import release_objects  # noqa: E402
from luffy_operator import manifests  # noqa: E402
from luffy_operator.api import parse_spec  # noqa: E402
from luffy_operator.manifests import RunRef  # noqa: E402

CHECKOV = Path(os.environ.get("LUFFY_CHECKOV", REPO / ".venvscan" / "bin" / "checkov"))
SKIPS = yaml.safe_load((Path(__file__).with_name("skips.yaml")).read_text())
EXAMPLE = REPO / "examples" / "luffyrun-qwen2.5-math-7b.yaml"

Obj = dict[str, Any]


def run_children(example: Path) -> list[Obj]:
    """Every object the operator creates for the example's LuffyRun (in namespace team-a)."""
    run = next(d for d in yaml.safe_load_all(example.read_text()) if d and d["kind"] == "LuffyRun")
    spec = parse_spec(run["spec"])
    ref = RunRef(run["metadata"]["name"], "team-a", "0b5e7a9e-1111-2222-3333-444455556666")
    return [
        *manifests.supporting_children(ref, spec),
        manifests.rollout_statefulset(ref, spec, spec.rollout.replicas),
        manifests.trainer_job(ref, spec, attempt=0, mlflow_run_id="abc123"),
    ]


def renderings() -> dict[str, list[Obj]]:
    return {
        "chart-default.yaml": release_objects("luffy"),
        "chart-mlflow.yaml": release_objects("mlflow-sqlite"),
        "run-qwen2.5-math-7b.yaml": run_children(EXAMPLE),
    }


def skip_entries() -> set[tuple[str, str]]:
    """(check id, resource pattern) of every skip."""
    return {(check_id, p) for check_id, skip in SKIPS.items() for p in skip.get("resources", ["*"])}


def matching_skip(check_id: str, resource: str) -> tuple[str, str] | None:
    return next((e for e in sorted(skip_entries()) if e[0] == check_id and fnmatch.fnmatchcase(resource, e[1])), None)


def scan(directory: Path) -> Obj:
    """checkov's JSON report for the Kubernetes manifests in `directory` (offline: nothing is downloaded)."""
    command = [str(CHECKOV), "--framework", "kubernetes", "--directory", str(directory), "--output", "json"]
    proc = subprocess.run(
        [*command, "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1), f"checkov failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", proc.stdout[:2000]
    return report


def test_checkov_passes_on_the_chart_and_a_runs_children(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.fail(
            f"{CHECKOV} does not exist: create it with `make scanner-venv` (make test does), or set LUFFY_CHECKOV."
        )
    files = renderings()
    for name, objects in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
    report = scan(tmp_path)
    summary, results = report["summary"], report["results"]
    assert summary["parsing_errors"] == 0, summary
    scanned = {Path(c["file_path"]).name for c in results["passed_checks"] + results["failed_checks"]}
    assert scanned == set(files), scanned  # every rendering was read, and nothing else
    failing, used = [], set()
    for check in results["failed_checks"]:
        skip = matching_skip(check["check_id"], check["resource"])
        if skip is None:
            failing.append(
                f"{check['check_id']} {check['resource']} ({check['file_path'].lstrip('/')}): {check['check_name']}"
            )
        else:
            used.add(skip)
    assert not failing, (
        "checkov failures (fix them, or skip them in tests/scanner/skips.yaml with a reason):\n" + "\n".join(failing)
    )
    assert skip_entries() <= used, f"skips matching no failure, remove them: {sorted(skip_entries() - used)}"
    assert summary["passed"] > 400, summary  # the scan ran its checks


def test_every_skip_has_a_one_line_reason() -> None:
    for check_id, skip in SKIPS.items():
        assert check_id.startswith(("CKV_K8S_", "CKV2_K8S_")), check_id
        assert set(skip) <= {"reason", "resources"}, check_id
        assert skip["reason"].strip() and "\n" not in skip["reason"], check_id
