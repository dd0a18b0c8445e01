"""Helpers of the operator tests: paths, bounded waits, an HTTP client of the emulator, the operator in a thread."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kmock
import kubernetes.config.kube_config
import yaml
from kmock_shim import EmulatorServer

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "luffyruns.luffy.dev.yaml"
RUNS = "/apis/luffy.dev/v1alpha1/namespaces/default/luffyruns"
NS = "/api/v1/namespaces/default"
CONFIGMAPS, SERVICES, SECRETS = f"{NS}/configmaps", f"{NS}/services", f"{NS}/secrets"
ACCOUNTS, CLAIMS = f"{NS}/serviceaccounts", f"{NS}/persistentvolumeclaims"
STATEFULSETS = "/apis/apps/v1/namespaces/default/statefulsets"
JOBS = "/apis/batch/v1/namespaces/default/jobs"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
ROLES = "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles"
BINDINGS = "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings"


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll `probe` until it returns something truthy; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class HttpApi:
    """A plain HTTP client of the emulator, independent of the operator's own client."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, obj)

    def merge(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def names(self, path: str) -> list[str]:
        return sorted(item["metadata"]["name"] for item in self.request("GET", path)["items"])


class Cluster:
    """The emulator with the LuffyRun CRD and a `default` namespace, and a kubeconfig pointing at it."""

    def __init__(self, server: EmulatorServer, kubeconfig: Path) -> None:
        self.server = server
        self.api = HttpApi(server.url)
        self.kubeconfig = kubeconfig

    def run(self, name: str) -> dict[str, Any] | None:
        return self.api.get(f"{RUNS}/{name}")

    def status(self, name: str) -> dict[str, Any]:
        return (self.run(name) or {}).get("status") or {}

    def requests(self, method: str, path_part: str) -> int:
        """How many requests of this HTTP method the emulator served on paths containing `path_part`."""

        def count(emulator: Any) -> int:
            return sum(1 for r in emulator if r.method.value == method and path_part in str(r.url.path))

        return self.server.call(count)

    def events(self, involving: str) -> list[dict[str, Any]]:
        items = self.api.request("GET", "/api/v1/namespaces/default/events")["items"]
        return [e for e in items if e.get("involvedObject", {}).get("name") == involving]


def kubectl(cluster: Cluster, cache: Path, *args: str) -> str:
    """The real kubectl against the emulator; its stdout."""
    cmd = ["kubectl", f"--kubeconfig={cluster.kubeconfig}", f"--cache-dir={cache}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def emulated_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh emulator seeded as a cluster; KUBECONFIG and the kubernetes client's default location point at it."""
    with EmulatorServer() as server:
        api = HttpApi(server.url)
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD_PATH.read_text()))
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(server.kubeconfig()))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield Cluster(server, kubeconfig)


class InProcessOperator:
    """The real operator (kopf + luffy_operator.handlers) in a background thread, against the emulator."""

    def __init__(self, cluster: Cluster, options: Sequence[str] = ("-A",), timeout: float = 30) -> None:
        from kopf.testing import KopfRunner

        self.cluster = cluster
        self.runner = KopfRunner(["run", "--standalone", *options, "-m", "luffy_operator.handlers"], timeout=timeout)

    def __enter__(self) -> InProcessOperator:
        self.runner.__enter__()

        def watching(emulator: Any) -> bool:
            return any(r.action == kmock.action.WATCH and "luffyruns" in str(r.url.path) for r in emulator)

        wait_for("the operator to watch LuffyRuns", lambda: self.cluster.server.call(watching), timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.__exit__(*exc)  # re-raises whatever crashed the operator
