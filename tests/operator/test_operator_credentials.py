"""Whose MLflow credentials the operator sends where, against the kmock emulator and a fake MLflow server that records
every request's Authorization header; and the run's control-token Secret, made once.

The operator is no deputy: a Secret a run merely names is never read or sent (only its labels are read); a labelled
one goes over https, or http where the installation allows it; the installation's own credentials go only to the
installation's MLflow server."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from luffy_operator.controller import MLFLOW_CREDENTIALS_LABEL, Controller
from luffy_operator.kube import METADATA_ONLY, KubeClient, load_api_client
from luffy_operator.settings import OperatorSettings
from luffyrun_samples import valid_run
from operator_harness import RUNS, SECRETS, Cluster, InProcessOperator, wait_for

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


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


def secret(name: str, labelled: bool) -> dict[str, Any]:
    labels = {MLFLOW_CREDENTIALS_LABEL: "true"} if labelled else {}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in {"username": "alice", "password": "s3cret"}.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels}, "data": data}


def run_body(name: str, **spec: Any) -> dict[str, Any]:
    body = valid_run(name, **spec)
    body["metadata"].update(uid=f"uid-{name}", generation=1)
    return body


def mlflow_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == "MlflowReady")


def secret_reads(cluster: Cluster, name: str) -> list[str]:
    """The Accept header of every GET of Secret `name` the operator made (the tests' own client is urllib's)."""

    def reads(emulator: Any) -> list[str]:
        path = f"{SECRETS}/{name}"
        return [
            r.headers.get("Accept", "")
            for r in emulator
            if r.method.value == "GET"
            and str(r.url.path) == path
            and not r.headers.get("User-Agent", "").startswith("Python-urllib")
        ]

    return cluster.server.call(reads)


def controller(**settings: Any) -> Controller:
    return Controller(KubeClient(load_api_client()), OperatorSettings(**settings), clock=lambda: "t")


def test_an_unlabelled_secret_is_never_read_or_sent(cluster: Cluster, operator: InProcessOperator) -> None:
    """The real operator: a run names a Secret it has no right to; MLflow wants credentials and gets none."""
    fake = FakeMlflow(require=BASIC)
    try:
        cluster.api.create(SECRETS, secret("team-b-creds", labelled=False))
        mlflow = {"trackingUri": fake.url, "credentialsSecret": {"name": "team-b-creds"}}
        cluster.api.create(RUNS, valid_run("thief", mlflow=mlflow))
        cond = wait_for(
            "the MLflow condition",
            lambda: mlflow_condition(cluster.status("thief")) if cluster.status("thief").get("conditions") else None,
        )
        assert (cond["status"], cond["reason"]) == ("False", "MlflowError")
        assert "HTTP 401" in cond["message"]
        assert f"not labelled {MLFLOW_CREDENTIALS_LABEL}=true" in cond["message"] and "team-b-creds" in cond["message"]
        assert fake.seen and fake.headers() == {None}
        reads = secret_reads(cluster, "team-b-creds")
        assert reads and all(accept == METADATA_ONLY for accept in reads)  # its labels, never its values
        assert cluster.status("thief")["reason"] == "WaitingForMlflow"
    finally:
        fake.close()


def test_a_labelled_secret_goes_over_http_only_where_the_installation_allows_it(
    cluster: Cluster, mlflow: FakeMlflow
) -> None:
    cluster.api.create(SECRETS, secret("own-creds", labelled=True))
    body = run_body("mine", mlflow={"trackingUri": mlflow.url, "credentialsSecret": {"name": "own-creds"}})
    refused = controller().reconcile(body, full=False)
    cond = mlflow_condition(refused.status)
    assert (cond["status"], cond["reason"]) == ("False", "MlflowError") and "https only" in cond["message"]
    assert mlflow.seen == [] and secret_reads(cluster, "own-creds") == [METADATA_ONLY]
    allowed = controller(mlflow_allow_http=True).reconcile(body, full=False)
    cond = mlflow_condition(allowed.status)
    assert (cond["status"], cond["reason"]) == ("True", "RunCreated") and "own-creds" in cond["message"]
    assert mlflow.headers() == {BASIC}


def test_the_installations_credentials_go_only_to_its_own_server(cluster: Cluster, mlflow: FakeMlflow) -> None:
    other = FakeMlflow()
    try:
        ours = controller(mlflow_tracking_uri=mlflow.url + "/", mlflow_token="op-t0ken", mlflow_allow_http=True)
        ours.reconcile(run_body("a", mlflow={"trackingUri": mlflow.url}), full=False)
        ours.reconcile(run_body("b", mlflow={"trackingUri": other.url}), full=False)
        assert mlflow.headers() == {"Bearer op-t0ken"} and other.seen and other.headers() == {None}
        # An unlabelled Secret changes nothing: still the installation's credentials, and the reason in the status.
        cluster.api.create(SECRETS, secret("named", labelled=False))
        outcome = ours.reconcile(
            run_body("c", mlflow={"trackingUri": mlflow.url, "credentialsSecret": {"name": "named"}}), full=False
        )
        assert "not labelled" in mlflow_condition(outcome.status)["message"]
        assert mlflow.headers() == {"Bearer op-t0ken"}
    finally:
        other.close()


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
    assert cluster.requests("POST", "/secrets") == 2 and secret_reads(cluster, "ctl-control") == []
