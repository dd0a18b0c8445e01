"""The chart's optional MLflow server: its storage variants, its Service, and the rendered command line run for real
(`mlflow server` from .venv on 127.0.0.1, the chart's own arguments and environment, the volume as a temp dir)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_cases import NAMESPACE, OWN_MLFLOW_IMAGE, S3, VALID
from chart_render import env_of, find, fullname, one, release_objects, render_all
from servers import free_port

Obj = dict[str, Any]


def mlflow_objects(release: str) -> list[Obj]:
    return [o for o in release_objects(release) if o["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow"]


def service_name(release: str) -> str:
    return f"{fullname(release)}-mlflow"


def mlflow_pod(release: str) -> Obj:
    return one(mlflow_objects(release), "Deployment")["spec"]["template"]


def mlflow_container(release: str) -> Obj:
    (container,) = mlflow_pod(release)["spec"]["containers"]
    return container


def allowed_hosts(release: str) -> list[str]:
    (flag,) = [a for a in mlflow_container(release)["args"] if a.startswith("--allowed-hosts=")]
    return flag.removeprefix("--allowed-hosts=").split(",")


def in_cluster_hosts(release: str) -> list[str]:
    svc = service_name(release)
    names = [svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc", f"{svc}.{NAMESPACE}.svc.cluster.local"]
    return names + [f"{n}:5000" for n in names]


def test_mlflow_is_off_by_default() -> None:
    assert mlflow_objects("luffy") == []
    assert "MLflow" not in render_all().notes["luffy"]


def test_sqlite_and_artifacts_on_a_kept_volume() -> None:
    objects = mlflow_objects("mlflow-sqlite")
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = mlflow_pod("mlflow-sqlite")["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod["volumes"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # the volume is writable
    assert pod["automountServiceAccountToken"] is False
    container = mlflow_container("mlflow-sqlite")
    env = env_of(container)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == f"sqlite:///{mount}/mlflow.db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith(f"{mount}/")
    assert container["command"] == ["mlflow", "server"] and "--serve-artifacts" in container["args"]
    assert container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2"


def test_service_reaches_the_server() -> None:
    objects = mlflow_objects("mlflow-sqlite")
    service = one(objects, "Service")
    assert service["metadata"]["name"] == service_name("mlflow-sqlite")
    pod = mlflow_pod("mlflow-sqlite")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container_port,) = mlflow_container("mlflow-sqlite")["ports"]
    assert (port["port"], port["targetPort"]) == (5000, container_port["name"])
    assert "--port=5000" in mlflow_container("mlflow-sqlite")["args"] and container_port["containerPort"] == 5000
    # No other component is selected by the Service.
    operator = one(release_objects("mlflow-sqlite"), "Deployment", f"{fullname('mlflow-sqlite')}-operator")
    assert not service["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items()


def test_postgres_and_s3_come_from_secrets_and_need_no_volume() -> None:
    objects = mlflow_objects("mlflow-postgres-s3")
    assert not find(objects, "PersistentVolumeClaim")
    pod = mlflow_pod("mlflow-postgres-s3")["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"] and "fsGroup" not in pod["securityContext"]
    env = env_of(mlflow_container("mlflow-postgres-s3"))
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    s3 = S3["s3"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == s3["destination"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var]["valueFrom"] == {"secretKeyRef": {"name": s3["existingSecret"], "key": var}}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == s3["endpointUrl"]
    assert env["AWS_DEFAULT_REGION"]["value"] == s3["region"]
    image = OWN_MLFLOW_IMAGE
    assert mlflow_container("mlflow-postgres-s3")["image"] == f"{image['repository']}:{image['tag']}"


def test_a_volume_only_where_something_is_stored() -> None:
    # Postgres with artifacts on the volume: a claim; sqlite with S3 and an existing claim: that claim, no new one.
    assert one(mlflow_objects("mlflow-postgres-pvc"), "PersistentVolumeClaim")
    assert not find(mlflow_objects("mlflow-sqlite-s3"), "PersistentVolumeClaim")
    volumes = mlflow_pod("mlflow-sqlite-s3")["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "mlflow-data"}} in volumes


def mlflow_admits(allowed: list[str], hosts: list[str]) -> dict[str, bool]:
    """MLflow's own Host-header matcher, asked in a child process: importing `mlflow.server` pulls in Flask, whose
    context proxies break vLLM's kernel-override scan of `sys.modules` in later in-process engine tests."""
    script = (
        "import json, sys\n"
        "from mlflow.server.security_utils import is_allowed_host_header\n"
        "allowed, hosts = json.load(sys.stdin)\n"
        "print(json.dumps({h: bool(is_allowed_host_header(allowed, h)) for h in hosts}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps([allowed, hosts]), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("release", ["mlflow-sqlite", "mlflow-postgres-pvc"])
def test_allowed_hosts_admit_cluster_clients_and_port_forwards_only(release: str) -> None:
    """MLflow rejects unknown Host headers (DNS rebinding); judged here by MLflow's own matcher."""
    good = [*in_cluster_hosts(release), "localhost:5000", "127.0.0.1:5000", "10.42.0.17:5000"]
    good += VALID[release]["mlflow"].get("extraAllowedHosts", [])
    bad = ["evil.example.com", f"{service_name(release)}.evil.example.com", "8.8.8.8:5000"]
    verdicts = mlflow_admits(allowed_hosts(release), good + bad)
    assert [h for h in good if not verdicts[h]] == []
    assert [h for h in bad if verdicts[h]] == []


def test_notes_tell_how_to_reach_mlflow_and_warn_about_missing_drivers() -> None:
    notes = render_all().notes
    svc = service_name("mlflow-sqlite")
    assert f"port-forward svc/{svc} 5000:5000" in notes["mlflow-sqlite"]
    assert f"http://{svc}.{NAMESPACE}.svc:5000" in notes["mlflow-sqlite"]
    assert "WARNING" not in notes["mlflow-sqlite"] and "WARNING" not in notes["mlflow-postgres-s3"]
    assert "no Postgres driver (psycopg2)" in notes["mlflow-official-postgres"]


# --- the rendered server, run ---------------------------------------------------------------------------------------


def local_command(release: str, root: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The container's command and environment for this machine: the volume is `root`, the port is `port`."""
    container = mlflow_container(release)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    local = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}
    args = [local.get(a, a) for a in container["args"]]
    env = {name: var["value"].replace(f"{mount}/", f"{root}/") for name, var in env_of(container).items()}
    env["HOME"] = str(root)
    command = [str(Path(sys.executable).with_name(container["command"][0])), *container["command"][1:]]
    return command + args, env


def request(url: str, host: str, body: Obj | None = None, method: str | None = None, data: bytes | None = None) -> Any:
    payload = json.dumps(body).encode() if body is not None else data
    req = urllib.request.Request(url, data=payload, method=method, headers={"Host": host})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=20) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


@pytest.fixture
def chart_mlflow(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` started as the mlflow-sqlite release's container would start it."""
    port = free_port()
    argv, env = local_command("mlflow-sqlite", tmp_path, port)
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server not healthy after 180 s"
                time.sleep(0.5)
        yield url, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_the_rendered_server_serves_cluster_clients_and_stores_on_the_volume(chart_mlflow: tuple[str, Path]) -> None:
    url, volume = chart_mlflow
    api = f"{url}/api/2.0/mlflow"
    svc_host = f"{service_name('mlflow-sqlite')}.{NAMESPACE}.svc:5000"  # what the operator and trainers send
    experiment = request(f"{api}/experiments/create", svc_host, {"name": "chart"})["experiment_id"]
    run = request(f"{api}/runs/create", "localhost:5000", {"experiment_id": experiment})["run"]["info"]
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")  # uploads go through the server (--serve-artifacts)
    artifact = run["artifact_uri"].removeprefix("mlflow-artifacts:/").lstrip("/") + "/hello.txt"
    request(f"{url}/api/2.0/mlflow-artifacts/artifacts/{artifact}", svc_host, method="PUT", data=b"hi")
    assert (volume / "artifacts" / artifact).read_bytes() == b"hi"
    assert (volume / "mlflow.db").stat().st_size > 0
    with pytest.raises(urllib.error.HTTPError) as refused:
        request(f"{api}/experiments/create", "evil.example.com", {"name": "evil"})
    assert refused.value.code == 403
