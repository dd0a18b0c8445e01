"""Reconcile latency and scale of the LuffyRun operator, against the kmock emulator.

What is measured:
  * latency: from the POST of one LuffyRun until all its children exist (ConfigMap, 2 Services, StatefulSet,
    2 NetworkPolicies, ServiceAccount, Role, RoleBinding, PVC) and its status has a phase; repeated, one run at a time;
  * scale: POST 100 LuffyRuns back to back, then the time until every one has all children and a phase, the
    operator process's resident memory (RSS) before, at its peak while reconciling, and after, and its CPU use in
    the steady state that follows (each run's timer polls its trainer Job and rollout StatefulSet every 10 s).

How: the shimmed kmock emulator (tests/operator/kmock_shim.py) serves HTTP from a thread of this process; the operator
runs as its own process (`luffy-operator run --standalone`, default settings) so its memory is measured alone. The
emulator is in-memory and runs no controllers (the trainer Job is not created, as no rollout becomes ready), so the
numbers are the operator's own cost plus the emulator's request handling, not a real API server's.

    .venv/bin/python benchmarks/operator.py                 # 5 single runs, then 100 at once
    .venv/bin/python benchmarks/operator.py --runs 50 --single 3

Run it as a script, as above: the standard library's `operator` is loaded before this file's directory joins
`sys.path`, so the file name shadows nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from kmock_shim import EmulatorServer  # noqa: E402
from luffy_operator import manifests  # noqa: E402
from luffy_operator.api import parse_spec  # noqa: E402
from luffy_operator.crd import crd_manifest  # noqa: E402
from luffy_operator.kube import RESOURCES  # noqa: E402

RUNS = "/apis/luffy.dev/v1alpha1/namespaces/default/luffyruns"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, obj: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url + path, data=json.dumps(obj).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def luffyrun(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "luffy.dev/v1alpha1",
        "kind": "LuffyRun",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "image": "luffy:0.1.0",
            "model": {"path": "/workspace/model"},
            "data": {"trainFiles": ["/workspace/data/train.parquet"]},
            "rollout": {"replicas": 2},
            "trainer": {"gpusPerNode": 4},
            "checkpoint": {"size": "100Gi"},
        },
    }


def expected_children(name: str, uid: str) -> set[tuple[str, str]]:
    """(plural, name) of every child the first reconcile must create, from the same pure builders."""
    ref, spec = manifests.RunRef(name, "default", uid), parse_spec(luffyrun(name)["spec"])
    objs = [*manifests.supporting_children(ref, spec), manifests.rollout_statefulset(ref, spec, 2)]
    return {(RESOURCES[(o["apiVersion"], o["kind"])], o["metadata"]["name"]) for o in objs}


def settled(server: EmulatorServer, expected: dict[str, set[tuple[str, str]]]) -> set[str]:
    """Names of the runs whose children all exist and whose status has a phase."""

    def check(emulator: Any) -> set[str]:
        present, phased = set(), set()
        for (res, _ns, name), obj in emulator.objects.items():
            if not obj.deleted:
                present.add((res.plural, name))
                if res.plural == "luffyruns" and (obj.raw.get("status") or {}).get("phase"):
                    phased.add(name)
        return {run for run, children in expected.items() if run in phased and children <= present}

    return server.call(check)


class Operator:
    """`luffy-operator run` as a child process, with its liveness endpoint and memory."""

    def __init__(self, kubeconfig: Path, port: int, log: Path) -> None:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        cmd = [sys.executable, "-m", "luffy_operator.cli", "run", "--standalone"]
        cmd += ["--liveness", f"http://127.0.0.1:{port}/healthz"]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.port = port

    def wait_alive(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("operator liveness endpoint did not answer")

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_settled(
    server: EmulatorServer, expected: dict[str, set[tuple[str, str]]], op: Operator, timeout: float
) -> tuple[float, int]:
    """Seconds until every run settled, and the operator's peak RSS meanwhile."""
    start, peak = time.monotonic(), op.rss()
    while time.monotonic() - start < timeout:
        peak = max(peak, op.rss())
        if settled(server, expected) == set(expected):
            return time.monotonic() - start, peak
        time.sleep(0.02)
    raise TimeoutError(f"not settled after {timeout}s: {len(settled(server, expected))}/{len(expected)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=5, help="single-run latency repetitions")
    parser.add_argument("--runs", type=int, default=100, help="LuffyRuns created at once")
    parser.add_argument("--steady", type=float, default=30, help="seconds of steady state measured afterwards")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds per phase")
    args = parser.parse_args()

    with EmulatorServer() as server, tempfile.TemporaryDirectory() as tmp:
        post(server.url, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd_manifest())
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        post(server.url, "/api/v1/namespaces", namespace)
        kubeconfig = Path(tmp) / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(server.kubeconfig()))
        op = Operator(kubeconfig, free_port(), Path(tmp) / "operator.log")
        try:
            op.wait_alive()
            time.sleep(1.0)
            rss_idle = op.rss()

            latencies = []
            for i in range(args.single):
                name = f"single-{i}"
                t0 = time.monotonic()
                uid = post(server.url, RUNS, luffyrun(name))["metadata"]["uid"]
                wait_settled(server, {name: expected_children(name, uid)}, op, args.timeout)
                latencies.append(time.monotonic() - t0)

            cpu0 = op.cpu_seconds()
            t0 = time.monotonic()
            expected = {}
            for i in range(args.runs):
                name = f"scale-{i:03d}"
                expected[name] = expected_children(name, post(server.url, RUNS, luffyrun(name))["metadata"]["uid"])
            posted = time.monotonic() - t0
            _, peak = wait_settled(server, expected, op, args.timeout)
            total = time.monotonic() - t0
            cpu = op.cpu_seconds() - cpu0
            cpu1 = op.cpu_seconds()
            time.sleep(args.steady)  # every run's timer keeps polling its Job and StatefulSet
            steady_cpu = (op.cpu_seconds() - cpu1) / args.steady
            rss_settled = op.rss()
        finally:
            op.stop()

    print(f"machine: {platform.machine()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"single-run reconcile latency over {args.single} runs (create -> all 10 children + status phase):")
    print(f"  median {statistics.median(latencies) * 1000:.0f} ms, min {min(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")  # fmt: skip
    print()
    print("| LuffyRuns | POSTs took (s) | all reconciled after (s) | runs/s | operator CPU (s) "
          "| RSS idle (MB) | RSS peak (MB) | RSS after (MB) | steady CPU (% of a core) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.runs} | {posted:.1f} | {total:.1f} | {args.runs / total:.1f} | {cpu:.1f} "
          f"| {rss_idle / MB:.0f} | {peak / MB:.0f} | {rss_settled / MB:.0f} | {steady_cpu * 100:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
