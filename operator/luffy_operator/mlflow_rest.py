"""The operator's MLflow calls, over MLflow's REST API with the standard library (the operator image has no mlflow).

The operator creates one MLflow run per LuffyRun, found again by the `luffy.uid` tag, so a crash between creating the
run and recording its id in status does not create a second one.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from luffy_trainer import contract

UID_TAG = "luffy.uid"


class MlflowError(Exception):
    """An MLflow call that failed; `unreachable` when no HTTP answer came back at all, `http_status` when one did."""

    def __init__(self, message: str, unreachable: bool = False, http_status: int | None = None) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.http_status = http_status

    @property
    def refused(self) -> bool:
        """The server wants credentials the caller did not send, or refused the ones it sent (401, 403)."""
        return self.http_status in (401, 403)


@dataclass(frozen=True)
class MlflowCredentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def header(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.username and self.password:
            pair = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return {}


@dataclass(frozen=True)
class MlflowRun:
    run_id: str
    experiment_id: str
    url: str


class MlflowRestClient:
    """A few REST calls against one tracking server."""

    def __init__(self, tracking_uri: str, credentials: MlflowCredentials | None = None, timeout_s: float = 10.0):
        self.base = tracking_uri.rstrip("/")
        self.credentials = credentials or MlflowCredentials()
        self.timeout_s = timeout_s

    def _call(self, method: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
        url = f"{self.base}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", **self.credentials.header()}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                detail = json.loads(payload)
            except ValueError:
                detail = {"message": payload[:200].decode(errors="replace")}
            code = detail.get("error_code", "")
            message = f"MLflow {endpoint}: HTTP {err.code} {code} {detail.get('message', '')}".strip()
            raise MlflowError(message, http_status=err.code) from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise MlflowError(f"cannot reach MLflow at {self.base}: {reason}", unreachable=True) from err

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if missing."""
        try:
            return self._call("GET", "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]
        except MlflowError as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                raise
        try:
            return self._call("POST", "experiments/create", {"name": name})["experiment_id"]
        except MlflowError as err:  # created concurrently
            if "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
            return self._call("GET", "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def ensure_run(self, experiment: str, run_name: str, uid: str, tags: dict[str, str]) -> MlflowRun:
        """The run tagged with `uid` in `experiment`, created with `run_name` and `tags` if there is none."""
        exp_id = self.experiment_id(experiment)
        found = self._call(
            "POST",
            "runs/search",
            {"experiment_ids": [exp_id], "filter": f"tags.`{UID_TAG}` = '{uid}'", "max_results": 1},
        ).get("runs", [])
        if found:
            run_id = found[0]["info"]["run_id"]
        else:
            body = {
                "experiment_id": exp_id,
                "run_name": run_name,
                "start_time": int(time.time() * 1000),
                "tags": [{"key": k, "value": v} for k, v in {**tags, UID_TAG: uid}.items()],
            }
            created = self._call("POST", "runs/create", body)
            run_id = created["run"]["info"]["run_id"]
        return MlflowRun(run_id=run_id, experiment_id=exp_id, url=f"{self.base}/#/experiments/{exp_id}/runs/{run_id}")

    def mark_failed(self, run_id: str) -> None:
        """End a run the trainer could not end itself."""
        self._call("POST", "runs/update", {"run_id": run_id, "status": "FAILED", "end_time": int(time.time() * 1000)})

    def model_version(self, model_name: str, run_id: str) -> str | None:
        """The newest version of `model_name` registered from `run_id` as its final model, if any: the best model's
        version (`bestModelAlias`, registered after the final one) is not the run's model."""
        versions = self._call("GET", "model-versions/search", filter=f"run_id='{run_id}'").get("model_versions", [])
        numbers = [
            int(v["version"])
            for v in versions
            if v.get("name") == model_name and _artifact(v) in (None, contract.FINAL_MODEL_ARTIFACT)
        ]
        return str(max(numbers)) if numbers else None


def _artifact(version: dict) -> str | None:
    """The logged model a version was registered from, as the trainer tags it (None: untagged, an older trainer)."""
    tags = {t.get("key"): t.get("value") for t in version.get("tags") or []}
    return tags.get(contract.MODEL_ARTIFACT_TAG)
