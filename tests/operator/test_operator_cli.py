"""The command line: `luffy-operator crd`, `luffy-operator run` as its own process, and kubectl against the emulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import yaml
from operator_harness import CRD_PATH, REPO, RUNS, STATEFULSETS, Cluster, InProcessOperator, kubectl, wait_for
from servers import free_port

# `luffy-operator`, as pyproject's console script runs it (it need not be installed in this environment).
LUFFY_OPERATOR = [sys.executable, "-m", "luffy_operator.cli"]


def test_luffy_operator_crd_prints_the_committed_crd() -> None:
    out = subprocess.run([*LUFFY_OPERATOR, "crd"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out == CRD_PATH.read_text()


def test_the_console_script_is_the_operator_cli() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["luffy-operator"] == "luffy_operator.cli:main"


def test_luffy_operator_runs_against_a_kubeconfig(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LUFFY_OPERATOR_RESYNC_SECONDS": "1"}
    log = (tmp_path / "operator.log").open("w")
    cmd = [
        *LUFFY_OPERATOR,
        "run",
        "--standalone",
        "--namespace",
        "default",
        "--liveness",
        f"http://127.0.0.1:{port}/healthz",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def alive() -> bool:
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200 and b"controller" in r.read()
            except OSError:
                return False

        wait_for("the liveness endpoint", alive, timeout=120, interval=0.5)
        cluster.api.create(RUNS, {**valid_cli_run(), "metadata": {"name": "cli", "namespace": "default"}})
        wait_for("the rollout StatefulSet", lambda: cluster.api.get(f"{STATEFULSETS}/cli-rollout"), timeout=60)
        wait_for("a status", lambda: cluster.status("cli").get("phase") == "Pending", timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]


def valid_cli_run() -> dict:
    docs = yaml.safe_load_all((REPO / "examples" / "luffyrun-tiny-cpu.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "LuffyRun")


def test_kubectl_shows_the_printer_columns_of_the_example(
    cluster: Cluster, operator: InProcessOperator, tmp_path: Path
) -> None:
    cache = tmp_path / "kube-cache"
    example = REPO / "examples" / "luffyrun-tiny-cpu.yaml"
    kubectl(cluster, cache, "apply", "--validate=false", "-f", str(example))
    wait_for("the operator's status", lambda: cluster.status("tiny-cpu").get("phase"), timeout=30)
    # What the operator copies from the trainer's progress report (with no trainer here, written directly).
    progress = {"step": 42, "totalSteps": 150, "reward": 0.625}
    cluster.api.merge(f"{RUNS}/tiny-cpu/status", {"status": {"progress": progress}})

    crd = yaml.safe_load(CRD_PATH.read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    spec = ",".join(["NAME:.metadata.name"] + [f"{c['name'].upper()}:{c['jsonPath']}" for c in columns])
    header, row = kubectl(cluster, cache, "get", "lr", "-o", f"custom-columns={spec}").splitlines()
    table = dict(zip(header.split(), row.split(), strict=True))
    assert table["NAME"] == "tiny-cpu"
    assert (table["PHASE"], table["STEP"], table["TOTAL"], table["REWARD"]) == ("Pending", "42", "150", "0.625")
    assert table["RESTARTS"] == "0" and table["REASON"] == "WaitingForMlflow"  # its MLflow host is not here
    assert table["AGE"] == cluster.run("tiny-cpu")["metadata"]["creationTimestamp"]
    assert "luffyrun.luffy.dev/tiny-cpu" in kubectl(cluster, cache, "get", "luffy", "-o", "name")  # the category
    assert kubectl(cluster, cache, "get", "luffyrun", "tiny-cpu", "-o", "jsonpath={.status.phase}") == "Pending"
