"""The operator's MLflow REST client against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from luffy_operator.mlflow_rest import UID_TAG, MlflowCredentials, MlflowError, MlflowRestClient
from servers import free_port


def rest(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """An independent MLflow REST call for setting up and checking the server's state."""
    full = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        full += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_a_run_is_created_once_per_luffyrun_uid(mlflow_uri: str) -> None:
    client = MlflowRestClient(mlflow_uri)
    uid = str(uuid.uuid4())
    first = client.ensure_run("luffy-ops", "demo", uid, {"luffy.run": "demo"})
    again = client.ensure_run("luffy-ops", "demo", uid, {"luffy.run": "demo"})
    other = client.ensure_run("luffy-ops", "demo", str(uuid.uuid4()), {})
    assert again == first and other.run_id != first.run_id
    run = rest(mlflow_uri, "runs/get", run_id=first.run_id)["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags[UID_TAG] == uid and tags["luffy.run"] == "demo" and tags["mlflow.runName"] == "demo"
    assert run["info"]["experiment_id"] == first.experiment_id
    experiment = rest(mlflow_uri, "experiments/get-by-name", experiment_name="luffy-ops")["experiment"]
    assert experiment["experiment_id"] == first.experiment_id
    assert first.url == f"{mlflow_uri}/#/experiments/{first.experiment_id}/runs/{first.run_id}"


def test_model_version_is_the_newest_registered_from_the_run(mlflow_uri: str) -> None:
    client = MlflowRestClient(mlflow_uri)
    run = client.ensure_run("luffy-models", "m", str(uuid.uuid4()), {})
    assert client.model_version("luffy-policy", run.run_id) is None
    name = f"luffy-policy-{uuid.uuid4().hex[:6]}"
    rest(mlflow_uri, "registered-models/create", {"name": name})
    unrelated = client.ensure_run("luffy-models", "n", str(uuid.uuid4()), {})
    for source in (run, run, unrelated):
        version = {"name": name, "source": f"runs:/{source.run_id}/model", "run_id": source.run_id}
        rest(mlflow_uri, "model-versions/create", version)
    assert client.model_version(name, run.run_id) == "2"
    assert client.model_version(name, unrelated.run_id) == "3"
    assert client.model_version("another-model", run.run_id) is None
    # The trainer tags each version with its logged model; the best model (registered after the final) is not it.
    for artifact in ("model", "best_model"):
        version = {"name": name, "source": f"runs:/{run.run_id}/{artifact}", "run_id": run.run_id}
        number = rest(mlflow_uri, "model-versions/create", version)["model_version"]["version"]
        tag = {"name": name, "version": number, "key": "luffy.artifact", "value": artifact}
        rest(mlflow_uri, "model-versions/set-tag", tag)
    assert client.model_version(name, run.run_id) == "4"


def test_a_failed_run_is_marked_failed(mlflow_uri: str) -> None:
    client = MlflowRestClient(mlflow_uri)
    run = client.ensure_run("luffy-ops", "doomed", str(uuid.uuid4()), {})
    assert rest(mlflow_uri, "runs/get", run_id=run.run_id)["run"]["info"]["status"] == "RUNNING"
    client.mark_failed(run.run_id)
    assert rest(mlflow_uri, "runs/get", run_id=run.run_id)["run"]["info"]["status"] == "FAILED"


def test_server_errors_name_the_call(mlflow_uri: str) -> None:
    with pytest.raises(MlflowError) as err:
        MlflowRestClient(mlflow_uri).mark_failed("no-such-run")
    assert "runs/update" in str(err.value) and not err.value.unreachable
    assert err.value.http_status is not None and err.value.http_status >= 400 and not err.value.refused


@pytest.mark.parametrize("code", [401, 403])
def test_a_server_that_wants_credentials_is_a_refusal(code: int) -> None:
    """401/403 (what an authenticating proxy in front of MLflow answers) is `refused`: the controller leaves the run
    to its trainer then, rather than retrying a call it has no credentials for."""

    class Refusing(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MlflowError) as err:
            MlflowRestClient(f"http://127.0.0.1:{server.server_port}").ensure_run("x", "y", "z", {})
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.refused and err.value.http_status == code and f"HTTP {code}" in str(err.value)


def test_an_unreachable_server_is_a_clear_error_not_a_hang() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(MlflowError) as err:
        MlflowRestClient(url, timeout_s=2).ensure_run("x", "y", "z", {})
    assert err.value.unreachable and url in str(err.value)
    assert time.monotonic() - started < 10


def test_credentials_become_an_authorization_header() -> None:
    basic = base64.b64encode(b"alice:s3cret").decode()
    assert MlflowCredentials("alice", "s3cret").header() == {"Authorization": f"Basic {basic}"}
    assert MlflowCredentials("alice", "s3cret", token="t0k").header() == {"Authorization": "Bearer t0k"}
    assert MlflowCredentials("alice").header() == {}
