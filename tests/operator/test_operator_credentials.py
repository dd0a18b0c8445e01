"""Whose MLflow credentials the operator sends where, with the real kopf operator against the kmock emulator and fake
MLflow servers that record every request's Authorization header; and the run's control-token Secret, made once.

The operator is no deputy: it reads no Secret at all (no get, list or watch, asserted on the emulator's request log),
so a Secret a run names reaches only the run's trainer pods (secretKeyRef). Its own calls carry the installation's
credentials, and only to the installation's MLflow server; a server that refuses the operator (401/403) leaves
creating the MLflow run to the trainer, which has the run's Secret."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from luffy_operator.controller import Controller
from luffy_operator.kube import KubeClient, load_api_client
from luffy_operator.reconcile import MLFLOW_DELEGATED, RECORD_ANNOTATION
from luffy_operator.settings import OperatorSettings
from luffyrun_samples import valid_run
from operator_harness import JOBS, RUNS, SECRETS, STATEFULSETS, Cluster, InProcessOperator, wait_for

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()  # what the runs' Secrets hold
INSTALLATION = "Bearer op-t0ken"  # the installation's token


class FakeMlflow:
    """Just enough of MLflow's REST API for the operator's calls; with `require`, other Authorization values get 401."""

    def __init__(self, require: str | None = None) -> None:
        self.require = require
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer()

            def answer(self) -> None:
                auth = self.headers.get("Authorization")
                fake.seen.append((self.path.split("?")[0], auth))
                endpoint = self.path.split("/api/2.0/mlflow/")[-1].split("?")[0]
                body: dict[str, Any] = {
                    "experiments/get-by-name": {"experiment": {"experiment_id": "7"}},
                    "runs/search": {"runs": []},
                    "runs/create": {"run": {"info": {"run_id": "run-1"}}},
                }.get(endpoint, {})
                status = 200
                if fake.require is not None and auth != fake.require:
                    status, body = 401, {"error_code": "UNAUTHENTICATED", "message": "credentials required"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def headers(self) -> set[str | None]:
        return {auth for _, auth in self.seen}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mlflow() -> Iterator[FakeMlflow]:
    fake = FakeMlflow()
    yield fake
    fake.close()


@pytest.fixture
def guarded() -> Iterator[FakeMlflow]:
    """A server that wants the runs' credentials (alice's), which the operator does not have."""
    fake = FakeMlflow(require=BASIC)
    yield fake
    fake.close()


def secret(name: str) -> dict[str, Any]:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in {"username": "alice", "password": "s3cret"}.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}


def run_body(name: str, **spec: Any) -> dict[str, Any]:
    body = valid_run(name, **spec)
    body["metadata"].update(uid=f"uid-{name}", generation=1)
    return body


def mlflow_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == "MlflowReady"), None)


def secret_reads(cluster: Cluster) -> list[tuple[str, str]]:
    """Every GET (get, list or watch) on Secrets that was not the tests' own client (urllib's): the operator's, kopf's
    and its kubernetes client's. The emulator enforces no RBAC, so its request log is where reads would show."""

    def reads(emulator: Any) -> list[tuple[str, str]]:
        return [
            (str(r.url.path), r.headers.get("User-Agent", ""))
            for r in emulator
            if r.method.value == "GET"
            and "/secrets" in str(r.url.path)
            and not r.headers.get("User-Agent", "").startswith("Python-urllib")
        ]

    return cluster.server.call(reads)


def trainer_env(cluster: Cluster, name: str) -> dict[str, dict[str, Any]]:
    job = wait_for(f"the trainer Job of {name}", lambda: cluster.api.get(f"{JOBS}/{name}-trainer"))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def rollout_ready(cluster: Cluster, name: str) -> None:
    path = f"{STATEFULSETS}/{name}-rollout"
    wait_for(f"the rollout of {name}", lambda: cluster.api.get(path))
    cluster.api.merge(f"{path}/status", {"status": {"replicas": 2, "readyReplicas": 2}})


def condition_of(cluster: Cluster, name: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        cond = mlflow_condition(cluster.status(name))
        return cond if cond and cond["reason"] == reason else None

    return wait_for(f"MlflowReady {reason} on {name}", probe)


def controller(**settings: Any) -> Controller:
    return Controller(KubeClient(load_api_client()), OperatorSettings(**settings), clock=lambda: "t")


@pytest.fixture
def installation_operator(
    cluster: Cluster, mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessOperator]:
    """The real operator with installation credentials for `mlflow` (a token; http allowed, as the chart's
    operator.mlflow.allowHttp). The handlers read their settings at import: the test sets them before kopf starts."""
    import luffy_operator.handlers as handlers

    settings = dataclasses.replace(
        handlers.SETTINGS, mlflow_tracking_uri=mlflow.url, mlflow_token="op-t0ken", mlflow_allow_http=True
    )
    settings.check()
    monkeypatch.setattr(handlers, "SETTINGS", settings)
    with InProcessOperator(cluster) as op:
        yield op
    assert op.runner.exit_code == 0, op.runner.output


def test_the_operator_reads_no_secret_and_sends_the_installations_credentials_only_to_its_server(
    cluster: Cluster, mlflow: FakeMlflow, installation_operator: InProcessOperator
) -> None:
    """Two runs name Secrets the operator has no right to read: one on the installation's server, which gets the
    installation's token; one on another server, which gets no credentials at all. Neither Secret is read, by any
    verb; both reach their trainer pods by secretKeyRef."""
    elsewhere = FakeMlflow()
    try:
        for name, uri in (("ours", mlflow.url), ("theirs", elsewhere.url)):
            cluster.api.create(SECRETS, secret(f"{name}-creds"))
            spec = {"trackingUri": uri, "credentialsSecret": {"name": f"{name}-creds"}}
            cluster.api.create(RUNS, valid_run(name, mlflow=spec))
        for name in ("ours", "theirs"):
            cond = condition_of(cluster, name, "RunCreated")
            assert cond["status"] == "True"
            rollout_ready(cluster, name)
            env = trainer_env(cluster, name)
            assert env["MLFLOW_RUN_ID"]["value"] == "run-1"
            refs = {
                k: env[k]["valueFrom"]["secretKeyRef"] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN")
            }
            assert {r["name"] for r in refs.values()} == {f"{name}-creds"}
        assert mlflow.seen and mlflow.headers() == {INSTALLATION}
        assert elsewhere.seen and elsewhere.headers() == {None}
        assert secret_reads(cluster) == []
    finally:
        elsewhere.close()


def test_a_server_that_refuses_the_operator_gets_its_run_from_the_trainer(
    cluster: Cluster, guarded: FakeMlflow, operator: InProcessOperator
) -> None:
    """The run's server wants credentials the operator does not have: the operator says so in MlflowReady (true,
    TrainerCreatesRun), starts the trainer with the run's Secret by secretKeyRef and without MLFLOW_RUN_ID, and calls
    that server no more for the run. A run naming no Secret waits, with a message saying what to name."""
    cluster.api.create(SECRETS, secret("team-creds"))
    spec = {"trackingUri": guarded.url, "credentialsSecret": {"name": "team-creds"}, "registeredModelName": "policy"}
    cluster.api.create(RUNS, valid_run("delegated", mlflow=spec))
    cond = condition_of(cluster, "delegated", "TrainerCreatesRun")
    assert cond["status"] == "True"
    server = guarded.url.removeprefix("http://")
    assert f"MLflow server http://{server} refused" in cond["message"] and "HTTP 401" in cond["message"]
    assert "team-creds" in cond["message"] and "operator.mlflow.credentialsSecret" in cond["message"]
    record = json.loads(cluster.run("delegated")["metadata"]["annotations"][RECORD_ANNOTATION])
    assert record[MLFLOW_DELEGATED] == cond["message"]
    rollout_ready(cluster, "delegated")
    env = trainer_env(cluster, "delegated")
    assert "MLFLOW_RUN_ID" not in env  # the trainer creates the run, and keeps its id in its checkpoints
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-creds",
        "key": "password",
        "optional": True,
    }
    calls = len(guarded.seen)
    time.sleep(2.0)  # four resync intervals
    assert len(guarded.seen) == calls and guarded.headers() == {None}  # asked once, without credentials
    assert cluster.status("delegated")["reason"] != "WaitingForMlflow"

    cluster.api.create(RUNS, valid_run("nameless", mlflow={"trackingUri": guarded.url}))
    cond = condition_of(cluster, "nameless", "MlflowError")
    assert cond["status"] == "False" and "spec.mlflow.credentialsSecret" in cond["message"]
    assert cluster.status("nameless")["reason"] == "WaitingForMlflow"
    assert cluster.api.get(f"{JOBS}/nameless-trainer") is None
    assert guarded.headers() == {None} and secret_reads(cluster) == []


def test_the_installations_credentials_go_over_http_only_where_it_allows_it(
    cluster: Cluster, mlflow: FakeMlflow
) -> None:
    body = run_body("mine", mlflow={"trackingUri": mlflow.url})
    refused = controller(mlflow_tracking_uri=mlflow.url, mlflow_token="op-t0ken").reconcile(body, full=False)
    cond = mlflow_condition(refused.status)
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "MlflowError")
    assert "https only" in cond["message"] and mlflow.seen == []
    allowed = controller(mlflow_tracking_uri=mlflow.url, mlflow_token="op-t0ken", mlflow_allow_http=True)
    cond = mlflow_condition(allowed.reconcile(body, full=False).status)
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", "RunCreated")
    assert mlflow.headers() == {INSTALLATION}
    # Same host, another port or scheme: not the installation's server, so no credentials.
    other_port = controller(mlflow_tracking_uri="http://127.0.0.1:1", mlflow_token="op-t0ken", mlflow_allow_http=True)
    mlflow.seen.clear()
    other_port.reconcile(run_body("other", mlflow={"trackingUri": mlflow.url}), full=False)
    assert mlflow.seen and mlflow.headers() == {None}
    assert secret_reads(cluster) == []


def test_a_server_that_refuses_the_installations_credentials_also_goes_to_the_trainer(
    cluster: Cluster, guarded: FakeMlflow
) -> None:
    ours = controller(mlflow_tracking_uri=guarded.url, mlflow_token="op-t0ken", mlflow_allow_http=True)
    spec = {"trackingUri": guarded.url, "credentialsSecret": {"name": "team-creds"}}
    outcome = ours.reconcile(run_body("refused", mlflow=spec), full=False)
    cond = mlflow_condition(outcome.status)
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", "TrainerCreatesRun")
    assert "refused the installation's credentials (HTTP 401)" in cond["message"]
    assert outcome.record is not None and outcome.record[MLFLOW_DELEGATED] == cond["message"]
    assert guarded.headers() == {INSTALLATION} and secret_reads(cluster) == []


def test_the_installations_credentials_need_their_server_and_https() -> None:
    env = {"LUFFY_OPERATOR_MLFLOW_TOKEN": "t"}
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI must name"):
        OperatorSettings.from_env(env)
    with pytest.raises(ValueError, match="https only"):
        OperatorSettings.from_env({**env, "LUFFY_OPERATOR_MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    settings = OperatorSettings.from_env(
        {**env, "LUFFY_OPERATOR_MLFLOW_TRACKING_URI": "http://mlflow:5000", "LUFFY_OPERATOR_MLFLOW_ALLOW_HTTP": "true"}
    )
    assert settings.has_mlflow_credentials and "'t'" not in repr(settings)  # never in the start-up log
    with pytest.raises(ValueError, match="not true or false"):
        OperatorSettings.from_env({"LUFFY_OPERATOR_MLFLOW_ALLOW_HTTP": "maybe"})
    rules = [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 6443}]}]
    assert OperatorSettings.from_env({"LUFFY_OPERATOR_RUN_EGRESS": json.dumps(rules)}).run_egress == tuple(rules)
    for bad in ("{", '{"to": []}', '[{"from": []}]', '[{"to": [{"ipBlock": {"cidr": "10.0.0.300/32"}}]}]'):
        with pytest.raises(ValueError, match="LUFFY_OPERATOR_RUN_EGRESS"):
            OperatorSettings.from_env({"LUFFY_OPERATOR_RUN_EGRESS": bad})


def test_the_control_secret_is_created_once_and_never_read(cluster: Cluster) -> None:
    ctl = controller()
    body = run_body("ctl")
    ctl.reconcile(body, full=True)
    first = cluster.api.get(f"{SECRETS}/ctl-control")
    token = base64.b64decode(first["data"]["token"]).decode()
    assert len(token) == 64 and int(token, 16) >= 0 and first["immutable"] is True
    assert first["metadata"]["ownerReferences"][0]["uid"] == "uid-ctl"
    ctl.reconcile(body, full=True)  # AlreadyExists is success: the token stays
    assert cluster.api.get(f"{SECRETS}/ctl-control")["data"] == first["data"]
    assert cluster.requests("POST", "/secrets") == 2 and secret_reads(cluster) == []
