"""The reconciler's edges: observe the children and MLflow, ask `reconcile.plan_run`, carry out the plan.

kopf handlers call `Controller.reconcile(body, full, retry)` and apply the returned status, annotations and events;
this module knows nothing of kopf, so it runs the same in tests and benchmarks. A pass never raises: whatever fails is
classified (`classify`) into the outcome's failure, which the handler turns into kopf's retry or no-retry.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from luffy_trainer.contract import API_VERSION, KIND, PROGRESS_KEY, progress_config_map

from luffy_operator import kueue, manifests
from luffy_operator.api import LuffyRunSpec
from luffy_operator.kube import ApiError, KubeClient, ObjectKey
from luffy_operator.manifests import RunRef
from luffy_operator.mlflow_rest import MlflowCredentials, MlflowError, MlflowRestClient
from luffy_operator.reconcile import (
    ACCEPTED_SPEC_ANNOTATION,
    MLFLOW_DELEGATED,
    RECORD_ANNOTATION,
    Event,
    Failure,
    JobView,
    MlflowView,
    Observed,
    Plan,
    RolloutView,
    RunView,
    needs_model_version,
    plan_run,
    reconciled,
    resolve_spec,
)
from luffy_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_FAILURE_MESSAGE = 1000  # Event messages are cut at 1 KiB


@dataclass
class Outcome:
    """What a handler writes back: status (merge), the accepted-spec and record annotations, Events, and the failure
    with the delay before its retry (None when permanent)."""

    status: dict[str, Any] | None = None
    accepted: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    failure: Failure | None = None
    retry_in: float | None = None


def annotation_values(outcome: Outcome) -> dict[str, str]:
    """The accepted-spec and record annotations an outcome sets (compact JSON)."""
    values = ((ACCEPTED_SPEC_ANNOTATION, outcome.accepted), (RECORD_ANNOTATION, outcome.record))
    return {k: json.dumps(v, sort_keys=True, separators=(",", ":")) for k, v in values if v is not None}


def event_manifest(body: Any, event: Event, now: str) -> dict[str, Any]:
    """A core v1 Event about a LuffyRun, as kopf posts them (message cut at 1 KiB)."""
    md = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{md['name']}.{secrets.token_hex(8)}", "namespace": md["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body.get("kind", KIND),
            "name": md["name"],
            "namespace": md["namespace"],
            "uid": md["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MAX_FAILURE_MESSAGE],
        "source": {"component": manifests.MANAGER},
        "reportingComponent": manifests.MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def classify(exc: BaseException, what: str = "") -> Failure:
    """Transient: the API server or MLflow may answer next time (no answer, 409 conflict, 429, 5xx, a timeout).
    Permanent: the same input fails the same way (any other 4xx, a bad value the validation missed, a bug)."""
    if isinstance(exc, ApiError):
        transient = exc.status == 0 or exc.status in (409, 429) or exc.status >= 500
        detail = str(exc)
    else:
        transient = isinstance(exc, MlflowError | ConnectionError | TimeoutError | kueue.PlacementError)
        detail = f"{type(exc).__name__}: {exc}"
    return Failure(permanent=not transient, message=f"{what}: {detail}" if what else detail)


def combined(failures: list[Failure]) -> Failure | None:
    """One failure for a pass: permanent if any part is."""
    if not failures:
        return None
    return Failure(any(f.permanent for f in failures), "; ".join(f.message for f in failures))


class Controller:
    def __init__(
        self,
        kube: KubeClient,
        settings: OperatorSettings | None = None,
        clock: Callable[[], str] = utc_now,
    ) -> None:
        self.kube = kube
        self.settings = settings or OperatorSettings()
        self.clock = clock

    def reconcile(self, body: Any, full: bool, retry: int = 0) -> Outcome:
        """One level-based pass over a LuffyRun. `full` (create/resume/update) also re-creates missing children;
        `retry` counts the retries of a failing pass, for the back-off."""
        run = RunView.from_body(body)
        now = self.clock()
        try:
            resolution = resolve_spec(run)
            if resolution.spec is None:
                observed = Observed(job=None, rollout=None)
            else:
                observed = self.observe(run, resolution.spec)
            plan = plan_run(run, resolution, observed, now, full, self.settings.run_egress)
        except Exception as exc:  # nothing was done: the status keeps its conditions and gains the failure
            log.exception("reconciling %s/%s failed", run.ref.namespace, run.ref.name)
            plan, failure = None, classify(exc)
        else:
            failure = combined(self.execute(run.ref, resolution.spec, plan))
        retry_in = None
        if failure is not None:
            message = failure.message[:MAX_FAILURE_MESSAGE]
            if not failure.permanent:
                retry_in = self.settings.backoff(retry)
                message += f" (retry {retry + 1} in {retry_in:g}s)"
            else:
                message += " (not retried until the spec changes or the operator restarts)"
            failure = Failure(failure.permanent, message)
        plan = reconciled(run, plan, now, failure)
        return Outcome(plan.status, plan.accepted, plan.record, plan.events, failure, retry_in)

    # --- observing --------------------------------------------------------------------------------------------------

    def observe(self, run: RunView, spec: LuffyRunSpec) -> Observed:
        ref = run.ref
        job_obj = self.kube.get(ObjectKey("batch/v1", "Job", ref.namespace, ref.trainer))
        job = JobView.of(job_obj) if job_obj else None
        rollout = None
        if spec.uses_rollouts:
            sts = self.kube.get(ObjectKey("apps/v1", "StatefulSet", ref.namespace, ref.rollout))
            rollout = RolloutView.of(sts) if sts else None
        progress = None
        if job is not None:  # a report counts only while the attempt that wrote it is there
            cm = self.kube.get(ObjectKey("v1", "ConfigMap", ref.namespace, progress_config_map(ref.name)))
            raw = ((cm or {}).get("data") or {}).get(PROGRESS_KEY)
            progress = raw if isinstance(raw, str) else None
        observed = Observed(job=job, rollout=rollout, mlflow=self.observe_mlflow(run, spec, job), progress=progress)
        return self.observe_kueue(ref, spec, observed) if spec.scheduling.queue_name else observed

    def observe_kueue(self, ref: RunRef, spec: LuffyRunSpec, observed: Observed) -> Observed:
        """The run's Workload, the ResourceFlavors its admission names, and (to create the Workload) the value of
        the run's PriorityClass."""
        workload = self.kube.get(ObjectKey(kueue.API_VERSION, kueue.WORKLOAD, ref.namespace, kueue.workload_name(ref)))
        flavors: dict[str, dict[str, Any]] = {}
        priority = None
        if workload is not None:
            for name in sorted(kueue.WorkloadView.of(workload).flavors()):
                flavor = self.kube.get(ObjectKey(kueue.API_VERSION, kueue.RESOURCE_FLAVOR, "", name))
                if flavor is not None:
                    flavors[name] = flavor
        elif spec.scheduling.priority_class_name:
            key = ObjectKey("scheduling.k8s.io/v1", "PriorityClass", "", spec.scheduling.priority_class_name)
            priority_class = self.kube.get(key)
            priority = int(priority_class["value"]) if priority_class and "value" in priority_class else None
        return replace(observed, workload=workload, flavors=flavors, priority=priority)

    def observe_mlflow(self, run: RunView, spec: LuffyRunSpec, job: JobView | None) -> MlflowView:
        """Create the MLflow run once; after success, look up the model version the trainer registered. A run whose
        MLflow server refused the operator (recorded in MLFLOW_DELEGATED) is left to its trainer: no more calls."""
        if spec.mlflow is None or run.record.get(MLFLOW_DELEGATED):
            return MlflowView()
        run_id = (run.record.get("mlflow") or {}).get("runId")
        wants_version = needs_model_version(spec, run.record, job)
        if run_id and not wants_version:
            return MlflowView()
        authenticated = False
        try:
            client, authenticated = self.mlflow_client(spec)
            if not run_id:
                created = client.ensure_run(
                    spec.mlflow.experiment_name,
                    spec.mlflow.run_name or run.ref.name,
                    run.ref.uid,
                    {"luffy.run": run.ref.name, "luffy.namespace": run.ref.namespace},
                )
                return MlflowView(run_id=created.run_id, experiment_id=created.experiment_id, url=created.url)
            version = client.model_version(spec.mlflow.registered_model_name or "", run_id)
            return MlflowView(model_version=version, model_lookup_done=True)
        except MlflowError as err:
            if err.refused and not run_id:
                message = self._refused_message(spec, err, authenticated)
                if spec.mlflow.credentials_secret is not None:
                    return MlflowView(delegated=message)
                return MlflowView(error=message)
            return MlflowView(error=str(err), unreachable=err.unreachable)

    def mlflow_client(self, spec: LuffyRunSpec) -> tuple[MlflowRestClient, bool]:
        """A client of the run's tracking server, and whether it authenticates (with the installation's credentials,
        the only ones the operator has)."""
        m = spec.mlflow
        assert m is not None and m.tracking_uri is not None
        credentials = self.installation_credentials(m.tracking_uri)
        client = MlflowRestClient(m.tracking_uri, credentials, timeout_s=self.settings.mlflow_timeout_seconds)
        return client, credentials is not None

    def installation_credentials(self, uri: str) -> MlflowCredentials | None:
        """The installation's MLflow credentials if `uri` is the installation's server (same scheme, host and port),
        else None. The operator reads no Secret: a run's spec.mlflow.credentialsSecret reaches only its trainer pods
        (secretKeyRef), so the operator is no deputy for a user who may create LuffyRuns but not read Secrets."""
        s = self.settings
        if not s.has_mlflow_credentials or _origin(uri) != _origin(s.mlflow_tracking_uri):
            return None
        scheme = urllib.parse.urlsplit(uri).scheme
        if scheme != "https" and not s.mlflow_allow_http:  # OperatorSettings.check refuses this at start-up too
            raise MlflowError(
                f"the operator sends its credentials over https only, and spec.mlflow.trackingUri is {scheme}:// "
                "(the installation may allow http: LUFFY_OPERATOR_MLFLOW_ALLOW_HTTP, chart operator.mlflow.allowHttp)"
            )
        return MlflowCredentials(s.mlflow_username or None, s.mlflow_password or None, s.mlflow_token or None)

    @staticmethod
    def _refused_message(spec: LuffyRunSpec, err: MlflowError, authenticated: bool) -> str:
        """The MlflowReady message for a server that refused the operator (401/403) before the MLflow run existed."""
        m = spec.mlflow
        assert m is not None and m.tracking_uri is not None
        server = _server(m.tracking_uri)
        sent = "the installation's credentials" if authenticated else "the operator's call (it has none for it)"
        if authenticated:
            how = (
                f"to let the operator create runs on {server}, the installation's credentials need access to it "
                "(chart operator.mlflow.credentialsSecret)"
            )
        else:
            how = (
                f"to let the operator create runs on {server}, the installation needs credentials for it: chart "
                "values operator.mlflow.trackingUri and operator.mlflow.credentialsSecret (LUFFY_OPERATOR_MLFLOW_"
                "TRACKING_URI, LUFFY_OPERATOR_MLFLOW_TOKEN or LUFFY_OPERATOR_MLFLOW_USERNAME/PASSWORD)"
            )
        if m.credentials_secret is None:
            return (
                f"MLflow server {server} refused {sent}: HTTP {err.http_status}. Name the run's credentials in "
                f"spec.mlflow.credentialsSecret (the trainer then creates the MLflow run), or {how}"
            )
        return (
            f"MLflow server {server} refused {sent} (HTTP {err.http_status}): the trainer creates the MLflow run with "
            f"spec.mlflow.credentialsSecret {m.credentials_secret.name}, and the operator neither looks up the "
            f"registered model version nor marks the MLflow run failed; {how}"
        )

    def write(self, body: Any, outcome: Outcome) -> None:
        """Write an outcome outside a kopf handler (the resync loop): what kopf's patch and kopf.event would do."""
        md = body["metadata"]
        key = ObjectKey(body.get("apiVersion", API_VERSION), body.get("kind", KIND), md["namespace"], md["name"])
        if outcome.status is not None:
            self.kube.patch(key, {"status": outcome.status}, subresource="status")
        annotations = annotation_values(outcome)
        if annotations:
            self.kube.patch(key, {"metadata": {"annotations": annotations}})
        for event in outcome.events:
            self.kube.create(event_manifest(body, event, self.clock()))

    # --- acting -----------------------------------------------------------------------------------------------------

    def execute(self, ref: RunRef, spec: LuffyRunSpec | None, plan: Plan) -> list[Failure]:
        """Carry out the plan; an action that fails is reported (and retried, if transient), the others go on."""
        errors: list[Failure] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as err:
                log.warning("%s failed: %s", what, err)
                errors.append(classify(err, what))

        for child in plan.ensure:
            attempt(f"creating {ObjectKey.of(child)}", lambda c=child: self.ensure(c))
        sts_key = ObjectKey("apps/v1", "StatefulSet", ref.namespace, ref.rollout)
        job_key = ObjectKey("batch/v1", "Job", ref.namespace, ref.trainer)
        if plan.scale_rollout is not None:
            replicas = plan.scale_rollout
            attempt(f"scaling {sts_key}", lambda: self.kube.patch(sts_key, {"spec": {"replicas": replicas}}))
        if plan.delete_job:
            # Foreground: the Job object stays until its pods are gone, so the next one cannot overlap them.
            attempt(f"deleting {job_key}", lambda: self.kube.delete(job_key, propagation="Foreground"))
        if plan.create_job is not None:
            job = plan.create_job
            attempt(f"creating {job_key}", lambda: self.kube.create(job))
        for key in plan.delete:
            attempt(f"deleting {key}", lambda k=key: self.kube.delete(k))
        if plan.workload_status is not None:
            wl_key = ObjectKey(kueue.API_VERSION, kueue.WORKLOAD, ref.namespace, kueue.workload_name(ref))
            patch = plan.workload_status
            attempt(f"updating {wl_key} status", lambda: self.kube.patch(wl_key, patch, subresource="status"))
        if plan.fail_mlflow_run and spec is not None and spec.mlflow is not None:
            try:
                self.mlflow_client(spec)[0].mark_failed(plan.fail_mlflow_run)
            except (MlflowError, ValueError) as err:  # best effort: the run has failed either way
                log.warning("could not mark MLflow run %s failed: %s", plan.fail_mlflow_run, err)
        return errors

    def ensure(self, child: manifests.Manifest) -> None:
        """Create a child, or bring the mutable part of an existing one in line. The control Secret gets its random
        token here, so plans stay deterministic; it is created once (an existing one is kept, never read)."""
        if manifests.is_control_secret(child):
            child = manifests.with_control_token(child, secrets.token_hex(32))
        if not self.kube.create(child):
            projection = manifests.mutable_projection(child)
            if projection is not None:
                self.kube.patch(ObjectKey.of(child), projection)


def _origin(uri: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port: where credentials for `uri` would go."""
    parts = urllib.parse.urlsplit(uri)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def _server(uri: str) -> str:
    """`uri`'s scheme, host and port, for messages (no path, no userinfo)."""
    scheme, host, port = _origin(uri)
    return f"{scheme}://{host}:{port}" if port is not None else f"{scheme}://{host}"
