"""MLflow tracking for a training run, tolerant of tracking-server outages.

Step metrics are queued and sent by a background thread, so a tracking server that is down for a while never stops
training: unsent metrics stay queued (the outage is logged once when it starts and once when it ends) and arrive when
the server is back. A restarted trainer attaches to the same run (MLFLOW_RUN_ID or the id saved in the checkpoint)
and skips steps that run already has, so no step is logged twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import luffy_trainer
from luffy_trainer import contract
from luffy_trainer.config import TrackingConfig, UserError

log = logging.getLogger(__name__)

# Marker metric logged at every step: its history tells a resumed run which steps are already recorded.
STEP_MARKER = "progress/step"
FLUSH_INTERVAL_S = 2.0
METRICS_PER_REQUEST = 900  # MLflow accepts at most 1000 metrics per log_batch
PARAM_VALUE_MAX_CHARS = 6000  # MLflow's limit on a param value
LUFFY_VERSION_TAG = "luffy.version"


def resolve_tracking_uri(config: TrackingConfig, workdir: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, else the config, else a SQLite store in the working directory (what `mlflow ui` opens)."""
    uri = os.environ.get(contract.ENV_MLFLOW_TRACKING_URI) or config.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


class MlflowTracker:
    """One MLflow run of a training (or an evaluation): params, buffered step metrics, artifacts, the final model."""

    def __init__(self, config: TrackingConfig, *, workdir: str | Path = ".") -> None:
        from mlflow.tracking import MlflowClient

        # Our own thread retries failed metric batches; keep each HTTP attempt short so shutdown stays bounded.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.config = config
        self.uri = resolve_tracking_uri(config, workdir)
        self.artifact_location = None
        if self.uri.startswith("sqlite:"):
            self.artifact_location = (Path(workdir) / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(self.uri)
        self.run_id: str | None = None
        self.previous_status: str | None = None  # of an existing run this tracker attached to, before it did
        self.last_logged_step = -1
        self._queue: deque[tuple[int, dict[str, float], int]] = deque()
        self._lock = threading.Lock()  # guards the queue
        self._send_lock = threading.Lock()  # one sender at a time: the background thread or an explicit flush
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._outage_since: float | None = None
        self._thread: threading.Thread | None = None
        self._system_monitor = None

    # --- run lifecycle ---------------------------------------------------------------------------------------------

    def start(self, params: dict[str, str], resume_run_id: str | None = None) -> str:
        """Create or attach to the run, record params; returns the run id."""
        run_id = os.environ.get(contract.ENV_MLFLOW_RUN_ID) or resume_run_id
        self.run_id = self._retry_until_reachable(lambda: self._open_run(run_id), "open the MLflow run")
        self.last_logged_step = self._retry_until_reachable(self._last_step, "read the run's history")
        if self.last_logged_step >= 0:
            log.info(
                "MLflow run %s already has steps up to %d; they will not be logged again",
                self.run_id,
                self.last_logged_step,
            )
        self._log_params(params)
        self._thread = threading.Thread(target=self._flush_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()
        if self.config.system_metrics:
            self._start_system_metrics()
        log.info("MLflow tracking: %s run %s", self.uri, self.run_id)
        return self.run_id

    def _open_run(self, run_id: str | None) -> str:
        if run_id:
            run = self.client.get_run(run_id)
            self.previous_status = run.info.status
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        name = os.environ.get(contract.ENV_MLFLOW_EXPERIMENT_NAME) or self.config.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(name, artifact_location=self.artifact_location)
        )
        return self.client.create_run(experiment_id, run_name=self.config.run_name).info.run_id

    def _last_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, STEP_MARKER)
        return max((m.step for m in history), default=-1)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        clipped = {k: v[:PARAM_VALUE_MAX_CHARS] for k, v in params.items()}
        new = [Param(k, v) for k, v in clipped.items() if k not in existing]
        changed = sorted(k for k, v in clipped.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("config differs from the run's recorded params (kept as recorded): %s", ", ".join(changed))
        for i in range(0, len(new), 90):
            self.client.log_batch(self.run_id, params=new[i : i + 90])

    def connect(self, run_id: str | None = None) -> None:
        """Reach the server (and read run `run_id`) now, so that a wrong address or run id fails before hours of
        work whose results could then not be logged."""
        try:
            if run_id:
                self._retry_until_reachable(lambda: self.client.get_run(run_id), f"read run {run_id}")
            else:
                self._retry_until_reachable(lambda: self.client.search_experiments(max_results=1), "list experiments")
        except RuntimeError as exc:  # refused: no such run, no permission
            raise UserError(str(exc)) from None

    def _retry_until_reachable(self, action, what: str):
        timeout_s = self.config.connect_timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while True:
            try:
                return action()
            except Exception as exc:
                if not _is_transient(exc):
                    raise RuntimeError(f"MLflow at {self.uri} refused to {what}: {_short(exc)}") from exc
                if time.monotonic() > deadline:
                    raise UserError(
                        f"cannot reach the MLflow tracking server at {self.uri} to {what} "
                        f"(tried for {timeout_s:g} s, tracking.connect_timeout_s): {_short(exc)}"
                    ) from None
                log.warning("MLflow at %s unreachable (%s); retrying in %.0fs", self.uri, _short(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, resume_logging=True, tracking_uri=self.uri
            )
            self._system_monitor.start()
        except Exception as exc:  # optional: a missing psutil/pynvml must not stop training
            log.warning("system metrics disabled: %s", exc)

    # --- metrics ---------------------------------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue the metrics of `step` (skipped if the run already has this step)."""
        if step <= self.last_logged_step:
            return
        values = {metric_name(k): float(v) for k, v in metrics.items()}
        values[STEP_MARKER] = float(step)
        with self._lock:
            self._queue.append((step, values, int(time.time() * 1000)))
        self.last_logged_step = step
        self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self._flush_once()

    def _flush_once(self) -> bool:
        """Send everything queued; on failure keep it queued. Returns whether the queue is empty."""
        with self._send_lock:
            return self._send_queued()

    def _send_queued(self) -> bool:
        from mlflow.entities import Metric

        one_step_at_a_time = False  # after a rejected batch, find the offending step(s) and drop only those
        while True:
            with self._lock:
                batch, count = [], 0
                for step, values, ts in self._queue:
                    if batch and (one_step_at_a_time or count + len(values) > METRICS_PER_REQUEST):
                        break
                    batch.append((step, values, ts))
                    count += len(values)
            if not batch:
                return True
            metrics = [Metric(k, v, ts, step) for step, values, ts in batch for k, v in values.items()]
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as exc:
                if _is_transient(exc):
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning(
                            "MLflow tracking server unreachable (%s); buffering metrics until it is back", _short(exc)
                        )
                    return False
                if len(batch) > 1:
                    one_step_at_a_time = True
                    continue
                log.error("MLflow rejected the metrics of step %d, dropped: %s", batch[0][0], _short(exc))
            with self._lock:
                for _ in batch:
                    self._queue.popleft()
            if self._outage_since is not None:
                log.warning(
                    "MLflow tracking server back after %.0fs; buffered metrics sent",
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None

    def flush(self, timeout_s: float) -> bool:
        """Try to send all queued metrics within `timeout_s`; returns whether everything was sent."""
        deadline = time.monotonic() + timeout_s
        while not self._flush_once():
            if time.monotonic() > deadline:
                return False
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        return True

    # --- artifacts and model ---------------------------------------------------------------------------------------

    def log_results(self, step: int, metrics: dict[str, float]) -> None:
        """Send the metrics of one step now, unqueued and without the step marker: results (of an evaluation) logged
        into any run, even a training run past `step`, which a resumed training then does not mistake for progress."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), METRICS_PER_REQUEST):
            chunk = batch[i : i + METRICS_PER_REQUEST]
            self._retry_until_reachable(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "log metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry_until_reachable(
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path), "log an artifact"
        )

    def log_datasets(self, files_by_context: dict[str, list[str]]) -> None:
        """Each data file as an MLflow dataset input (its name, content digest and path, the context as the
        `mlflow.data.context` tag), so the runs table says what a run was trained, validated or scored on."""
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for context, files in files_by_context.items():
            for file in files:
                path = Path(file).resolve()
                source = get_dataset_source_from_json(json.dumps({"uri": str(path)}), source_type="local")
                dataset = MetaDataset(source, name=path.name, digest=content_digest(path))
                tag = InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)
                inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag]))
        if inputs:
            self._retry_until_reachable(lambda: self.client.log_inputs(self.run_id, datasets=inputs), "log datasets")

    def log_code_version(self, entry_point: str) -> None:
        """The standard source tags (entry point, git commit when luffy runs from a git checkout) and luffy's version,
        so a run says which code produced it."""
        from mlflow.entities import SourceType
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

        tags = {
            MLFLOW_SOURCE_NAME: entry_point,
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
            LUFFY_VERSION_TAG: luffy_trainer.__version__,
        }
        commit = source_commit()
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        self.set_tags(tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._retry_until_reachable(lambda: self.client.log_text(self.run_id, text, artifact_file), "log an artifact")

    def nest(self, child_run_ids: list[str]) -> None:
        """Show the given runs under this one in the MLflow UI (the standard parent-run tag on each)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        for child in child_run_ids:
            self._retry_until_reachable(
                lambda child=child: self.client.set_tag(child, MLFLOW_PARENT_RUN_ID, self.run_id), "nest a run"
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._retry_until_reachable(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v), "set a tag")

    def log_model(
        self, model_dir: str | Path, artifact_name: str = contract.FINAL_MODEL_ARTIFACT, alias: str | None = None
    ) -> str | None:
        """Log a saved model directory as an MLflow transformers model; register it when configured, tag the version
        with the artifact's name (so the operator can tell the final model from the best one) and point `alias` at
        it. Returns the registered version, if any."""
        import mlflow

        name = self.config.registered_model_name

        def _log():
            # The fluent API needs a global tracking URI; mlflow.set_tracking_uri would also export it to the
            # environment, where it would outlive this call.
            previous = os.environ.get(contract.ENV_MLFLOW_TRACKING_URI)
            mlflow.set_tracking_uri(self.uri)
            try:
                with mlflow.start_run(run_id=self.run_id):
                    return mlflow.transformers.log_model(
                        transformers_model=str(model_dir),
                        name=artifact_name,
                        task="text-generation",
                        registered_model_name=name,
                        # Stated, not inferred: inference imports every optional transformers dependency.
                        pip_requirements=model_requirements(),
                    )
            finally:
                mlflow.set_tracking_uri(previous)  # None also removes the environment variable

        info = self._retry_until_reachable(_log, "log the model")
        version = getattr(info, "registered_model_version", None)
        if name and version is not None:
            self._retry_until_reachable(
                lambda: self.client.set_model_version_tag(
                    name, str(version), contract.MODEL_ARTIFACT_TAG, artifact_name
                ),
                "tag the model version",
            )
        if name and version is not None and alias:
            self._retry_until_reachable(
                lambda: self.client.set_registered_model_alias(name, alias, str(version)), "set the model alias"
            )
        return None if version is None else str(version)

    def finish(self, status: str = "FINISHED", flush_timeout_s: float = 300.0, spill_dir: str | Path = ".") -> None:
        """Stop background work, send what is queued; anything still unsent is written to a JSONL file."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._system_monitor is not None:
            try:
                self._system_monitor.finish()
            except Exception as exc:
                log.warning("stopping system metrics failed: %s", exc)
        if not self.flush(flush_timeout_s):
            spill = Path(spill_dir) / f"unsent_metrics_{self.run_id}.jsonl"
            with self._lock, spill.open("a") as f:
                for step, values, ts in self._queue:
                    f.write(json.dumps({"step": step, "timestamp": ts, "metrics": values}) + "\n")
            log.error("MLflow unreachable at shutdown: %d steps of metrics written to %s", self.pending, spill)
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, _short(exc))


def content_digest(path: Path) -> str:
    """12 hex digits of the SHA-256 of a file's bytes, or for a directory of each file's relative path and bytes."""
    digest = hashlib.sha256()

    def feed(file: Path) -> None:
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)

    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            feed(file)
    else:
        feed(path)
    return digest.hexdigest()[:12]


def source_commit() -> str | None:
    """The git commit of the luffy source tree when this package runs from a git checkout (not merely from a
    directory inside some repository, such as a virtual environment in one); None otherwise."""
    package = Path(luffy_trainer.__file__).parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    return git("rev-parse", "HEAD") if git("ls-files", "--error-unmatch", "__init__.py") else None


def metric_name(name: str) -> str:
    """MLflow metric names allow no '@': `val/math/avg@8` is logged as `val/math/avg_at_8`."""
    return name.replace("@", "_at_")


def model_requirements() -> list[str]:
    """The packages that load the logged model, at the versions that trained it."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "safetensors", "tokenizers")]


def _is_transient(exc: Exception) -> bool:
    """A network failure or a 5xx answer, worth retrying; anything else (4xx, a local error) is not."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError))


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
