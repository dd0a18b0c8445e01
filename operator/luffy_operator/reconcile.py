"""The operator's decisions: a pure function from (the LuffyRun, what was observed) to a plan and the new status.

Level-based: every call looks at the current trainer Job, rollout StatefulSet and MLflow state and decides the next
step, so running it twice, concurrently (a handler and the resync loop) or after an operator restart does no harm.
Creating an existing child is a no-op, and a trainer failure or disruption is counted once because every Job carries
its attempt number: the next attempt is restarts + disruptions, so a failed Job whose attempt equals it is counted (a
disruption in `disruptions`, any other failure in `restarts`); one with a smaller attempt has been counted and is
deleted; with no Job, a new one is created with the next attempt.

What the decisions read back is the operator's record (RECORD_ANNOTATION, on the LuffyRun's metadata, which a writer of
the status subresource cannot change), never the status: the status is a cache rebuilt on every pass, and a forged
one changes nothing decided here. Its conditions only lend their transition times.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from luffy_trainer.contract import MAX_PROGRESS_BYTES, ProgressReport, ProgressStatus
from pydantic import ValidationError

from luffy_operator import kueue, manifests
from luffy_operator.api import (
    MAX_CONDITION_MESSAGE,
    TERMINAL_PHASES,
    Condition,
    LuffyRunSpec,
    LuffyRunStatus,
    MlflowStatus,
    Phase,
    RolloutStatus,
    SpecError,
    TrainerStatus,
    check_name,
    dump_spec,
    immutable_changes,
    parse_spec,
    with_mutable_fields,
)
from luffy_operator.kube import ObjectKey
from luffy_operator.manifests import Manifest, RunRef

ACCEPTED_SPEC_ANNOTATION = "luffy.dev/accepted-spec"
# The operator's authoritative record: the status fields its decisions read back, plus the attempt the recorded
# progress came from and the generation a permanent error stalled at.
RECORD_ANNOTATION = "luffy.dev/record"
RECORD_FIELDS = (
    "phase",
    "reason",
    "message",
    "restarts",
    "disruptions",
    "mlflow",
    "progress",
    "startTime",
    "completionTime",
    "finalized",
)
# In the record: why the operator left creating the MLflow run to the trainer (its server refused the operator with
# 401/403 and the run names a credentialsSecret the trainer gets). Once there, the operator no longer calls that server
# for the run: the trainer's run is the run's MLflow run, and another created later would duplicate it.
MLFLOW_DELEGATED = "mlflowDelegated"
MAX_ABS_REWARD = 1e9  # a progress report's reward beyond this is refused


@dataclass(frozen=True)
class RunView:
    """What the operator reads from a LuffyRun object."""

    ref: RunRef
    generation: int
    spec: Any
    status: dict[str, Any]  # a cache: only its conditions' transition times are read
    accepted_spec: dict[str, Any] | None
    record: dict[str, Any] = field(default_factory=dict)
    created: str | None = None  # metadata.creationTimestamp: spec.activeDeadlineSeconds counts from it

    @classmethod
    def from_body(cls, body: Any) -> RunView:
        md = body["metadata"]
        annotations = md.get("annotations") or {}
        accepted = read_annotation(annotations, ACCEPTED_SPEC_ANNOTATION)
        status = _plain(body.get("status")) or {}
        record = read_annotation(annotations, RECORD_ANNOTATION)
        if RECORD_ANNOTATION not in annotations:  # a run from before the record: its status was the operator's own
            record = {k: v for k, v in status.items() if k in RECORD_FIELDS}
        return cls(
            ref=RunRef(name=md["name"], namespace=md["namespace"], uid=md["uid"]),
            generation=int(md.get("generation") or 0),
            spec=_plain(body.get("spec")),
            status=status,
            accepted_spec=accepted or None,
            record=record,
            created=md.get("creationTimestamp"),
        )


def read_annotation(annotations: Any, key: str) -> dict[str, Any]:
    """A JSON object annotation of the operator's; {} when absent or not an object."""
    raw = annotations.get(key)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def _plain(value: Any) -> Any:
    """kopf bodies are read-only mapping views; copy them into plain dicts and lists."""
    if value is None:
        return None
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class JobView:
    """The trainer Job, as far as decisions need it."""

    attempt: int
    restarts: int  # counted toward maxRestarts when the Job was made; attempt - restarts disruptions came before
    rollout_replicas: int
    complete: bool
    failed: bool
    failure: str
    active: int
    ready: int
    succeeded: int
    failed_pods: int
    terminating: bool
    disrupted: bool = False  # failed by the disruption rule of its podFailurePolicy (the Job controller says so)
    deadline_exceeded: bool = False  # failed by its activeDeadlineSeconds: the run's deadline

    @property
    def running(self) -> bool:
        return not (self.complete or self.failed or self.terminating)

    @classmethod
    def of(cls, job: dict[str, Any]) -> JobView:
        md, status = job["metadata"], job.get("status") or {}
        annotations = md.get("annotations") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
        failed = conditions.get("Failed", {})
        attempt = int(annotations.get(manifests.ATTEMPT_ANNOTATION, 0))
        return cls(
            attempt=attempt,
            restarts=int(annotations.get(manifests.RESTARTS_ANNOTATION, attempt)),  # older Jobs: every one counted
            rollout_replicas=int(annotations.get(manifests.ROLLOUT_REPLICAS_ANNOTATION, 0)),
            complete="Complete" in conditions,
            failed=bool(failed),
            failure=": ".join(p for p in (failed.get("reason"), failed.get("message")) if p) or "failed",
            active=int(status.get("active") or 0),
            ready=int(status.get("ready") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed_pods=int(status.get("failed") or 0),
            terminating=bool(md.get("deletionTimestamp")),
            disrupted=bool(failed) and is_disruption(failed),
            deadline_exceeded=failed.get("reason") == "DeadlineExceeded",
        )


def is_disruption(failed: dict[str, Any]) -> bool:
    """Whether a Job's Failed condition comes from the disruption rule of its podFailurePolicy. The Job controller
    writes reason PodFailurePolicy and a message ending "... matching FailJob rule at index N"; no workload can."""
    message = failed.get("message") or ""
    return failed.get("reason") == "PodFailurePolicy" and message.endswith(f"rule at index {manifests.DISRUPTION_RULE}")


@dataclass(frozen=True)
class Counts:
    """Trainer restarts counted toward maxRestarts and those after disruptions (not counted). The next Job's attempt
    is their sum, so a failed Job whose attempt equals it is a failure not yet counted."""

    restarts: int
    disruptions: int

    @property
    def attempt(self) -> int:
        return self.restarts + self.disruptions


@dataclass(frozen=True)
class RolloutView:
    """The rollout StatefulSet: wanted and ready replicas."""

    replicas: int
    ready: int

    @classmethod
    def of(cls, sts: dict[str, Any]) -> RolloutView:
        replicas = (sts.get("spec") or {}).get("replicas") or 0
        return cls(replicas=int(replicas), ready=int((sts.get("status") or {}).get("readyReplicas") or 0))


@dataclass(frozen=True)
class MlflowView:
    """What MLflow said this time: a run ensured, a model version found, or an error."""

    run_id: str | None = None
    experiment_id: str | None = None
    url: str | None = None
    error: str | None = None
    unreachable: bool = False
    model_version: str | None = None
    model_lookup_done: bool = False
    delegated: str | None = None  # the server refused the operator: the trainer creates the run (the reason)


@dataclass(frozen=True)
class Observed:
    job: JobView | None
    rollout: RolloutView | None
    mlflow: MlflowView = field(default_factory=MlflowView)
    progress: str | None = None  # the trainer's raw report from its progress ConfigMap, unchecked
    workload: dict[str, Any] | None = None  # the run's Kueue Workload (with spec.scheduling.queueName)
    flavors: dict[str, dict[str, Any]] = field(default_factory=dict)  # the ResourceFlavors its admission names
    priority: int | None = None  # the value of spec.scheduling.priorityClassName, for a Workload to create

    @property
    def admission(self) -> kueue.WorkloadView | None:
        return kueue.WorkloadView.of(self.workload) if self.workload else None


@dataclass(frozen=True)
class Resolution:
    """The spec the operator runs: the current one, or the last accepted one when an edit is refused."""

    spec: LuffyRunSpec | None
    accepted: dict[str, Any] | None  # new value of the accepted-spec annotation; None leaves it
    reason: str  # Accepted | InvalidSpec | ImmutableFieldChanged
    message: str


def resolve_spec(run: RunView) -> Resolution:
    """Validate the spec and apply the immutability rule against the last accepted spec."""
    try:
        check_name(run.ref.name)
        current = parse_spec(run.spec)
    except SpecError as err:
        previous = _parse_or_none(run.accepted_spec)
        if previous is None:
            return Resolution(None, None, "InvalidSpec", str(err))
        return Resolution(previous, None, "InvalidSpec", f"{err}; still running the last accepted spec")
    previous = _parse_or_none(run.accepted_spec)
    current_dump = dump_spec(current)
    if previous is None:
        return Resolution(current, current_dump, "Accepted", "spec accepted")
    previous_dump = dump_spec(previous)
    changed = immutable_changes(previous_dump, current_dump)
    if changed:
        effective = parse_spec(with_mutable_fields(previous_dump, current_dump))
        effective_dump = dump_spec(effective)
        message = (
            f"{', '.join(changed)} cannot change after creation; the change is ignored "
            "(revert it, or create a new LuffyRun)"
        )
        return Resolution(
            effective, effective_dump if effective_dump != run.accepted_spec else None, "ImmutableFieldChanged", message
        )
    return Resolution(current, current_dump if current_dump != run.accepted_spec else None, "Accepted", "spec accepted")


def _parse_or_none(raw: dict[str, Any] | None) -> LuffyRunSpec | None:
    if raw is None:
        return None
    try:
        return parse_spec(raw)
    except SpecError:
        return None


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    """What to do now, and the status to record."""

    status: dict[str, Any]
    accepted: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    ensure: list[Manifest] = field(default_factory=list)
    scale_rollout: int | None = None
    delete_job: bool = False
    create_job: Manifest | None = None
    delete: list[ObjectKey] = field(default_factory=list)
    workload_status: dict[str, Any] | None = None  # a status patch of the run's Kueue Workload
    fail_mlflow_run: str | None = None
    events: list[Event] = field(default_factory=list)


WARNING_PHASES = ("Failed", "Restarting")
SUSPENDED_MESSAGE = "spec.suspend is true: trainer stopped, rollout scaled to zero"
EVENT_CONDITIONS = ("SpecAccepted", "MlflowReady", "RolloutReady")


class StatusBuilder:
    """The new status as a `LuffyRunStatus`, keeping condition transition times where a condition did not change.

    Only the fields set here are written (a merge patch); `startTime` is set once."""

    def __init__(self, old: dict[str, Any], now: str, generation: int) -> None:
        self.old = old
        self.now = now
        self.generation = generation
        self.conditions: dict[str, Condition] = {}
        self.status = LuffyRunStatus(observed_generation=generation)

    def condition(self, type_: str, ok: bool, reason: str, message: str) -> None:
        status = "True" if ok else "False"
        previous = next((c for c in self.old.get("conditions") or [] if c.get("type") == type_), None)
        changed = previous is None or previous.get("status") != status
        self.conditions[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message[:MAX_CONDITION_MESSAGE],
            last_transition_time=self.now if changed else previous.get("lastTransitionTime", self.now),
            observed_generation=self.generation,
        )

    def phase(self, phase: Phase, reason: str, message: str) -> None:
        self.status.phase, self.status.reason, self.status.message = phase, reason, message

    def build(self) -> dict[str, Any]:
        """The status patch, spelled as the CRD spells it."""
        self.status.conditions = list(self.conditions.values())
        return self.status.model_dump(mode="json", by_alias=True, exclude_unset=True)


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """One Event per phase change and per change of the SpecAccepted, MlflowReady and RolloutReady conditions."""
    events = []
    if new.get("phase") != old.get("phase") or new.get("reason") != old.get("reason"):
        kind = "Warning" if new.get("phase") in WARNING_PHASES else "Normal"
        events.append(Event(kind, new.get("reason") or new["phase"], f"{new['phase']}: {new.get('message', '')}"))
    before = {c.get("type"): c for c in old.get("conditions") or []}
    for cond in new.get("conditions", []):
        if cond["type"] not in EVENT_CONDITIONS:
            continue
        prev = before.get(cond["type"])
        if prev is None and cond["status"] == "True" and cond["type"] != "RolloutReady":
            continue  # SpecAccepted/MlflowReady becoming true at creation is covered by the phase event
        if prev is None or (prev.get("status"), prev.get("reason")) != (cond["status"], cond["reason"]):
            kind = "Warning" if cond["status"] == "False" and cond["type"] != "RolloutReady" else "Normal"
            events.append(Event(kind, cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}"))
    return events


def _workload_keys(run: RunRef, spec: LuffyRunSpec) -> list[ObjectKey]:
    """What cleanup `Delete` removes: the workloads and their Services, NetworkPolicies and RBAC."""
    objs = [manifests.trainer_job(run, spec, 0, None)]
    if spec.uses_rollouts:
        objs.append(manifests.rollout_statefulset(run, spec, 0))
    keep = {"ConfigMap", "PersistentVolumeClaim", "Secret"}  # the Secret goes with the LuffyRun (ownerReference)
    objs += [o for o in manifests.supporting_children(run, spec) if o["kind"] not in keep]
    return [ObjectKey.of(o) for o in objs]


def plan_run(
    run: RunView, res: Resolution, obs: Observed, now: str, full: bool, extra_egress: Sequence[dict[str, Any]] = ()
) -> Plan:
    """Decide the next actions and the status for one LuffyRun: admission and the trainer's lifecycle give the phase,
    the phase gives the rollout's size and the cleanup, and all of it the status. `old` is the record, with the
    cached conditions for their transition times. `extra_egress`: the installation's egress rules for the run's
    NetworkPolicies."""
    old = {**run.record, "conditions": run.status.get("conditions") or []}
    if res.spec is None:
        return _refused(old, res, StatusBuilder(old, now, run.generation))
    if old.get("reason") == "InvalidSpec" and run.accepted_spec is None:
        old = {}  # a run that never had a valid spec starts afresh once it has one
    spec = res.spec
    st = StatusBuilder(old, now, run.generation)
    st.condition("SpecAccepted", res.reason == "Accepted", res.reason, res.message)
    delegated = (obs.mlflow.delegated or old.get(MLFLOW_DELEGATED)) if spec.mlflow is not None else None
    mlflow = _mlflow_status(spec, old, obs.mlflow, delegated, st)
    mlflow_run_id = mlflow.run_id if mlflow else None

    plan = Plan(status={}, accepted=res.accepted)
    counts = _next_phase(run, spec, old, obs, mlflow_run_id, bool(delegated), st, plan, extra_egress)
    finished = st.status.phase in TERMINAL_PHASES
    queued = st.status.phase == "Queued"
    desired = spec.rollout.replicas if spec.uses_rollouts and not spec.suspend and not finished and not queued else 0
    cleanup = spec.cleanup.on_success if st.status.phase == "Succeeded" else spec.cleanup.on_failure
    deleting = finished and cleanup == "Delete"
    due = not deleting or _cleanup_due(spec, old.get("completionTime") or now, now)  # till then: not finalized
    _plan_children(run.ref, spec, obs, desired, deleting and due, full, plan, extra_egress, queued)
    if spec.scheduling.queue_name is not None:
        _plan_workload(run.ref, spec, obs, now, st, plan)
    _record_status(spec, old, obs, now, desired, deleting, counts, mlflow, bool(delegated), st)
    progress_attempt = _progress(spec, old, obs, st)
    plan.status = st.build()
    plan.record = _new_record(run.record, plan.status, progressAttempt=progress_attempt)
    if delegated:
        plan.record[MLFLOW_DELEGATED] = delegated
    plan.events = transition_events(old, plan.status)
    return plan


def _new_record(record: dict[str, Any], status: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record after a pass: the decided status fields over the old ones. A stalled generation is dropped, since
    this pass went through."""
    kept = {k: v for k, v in record.items() if k in RECORD_FIELDS}
    return {**kept, **{k: status[k] for k in RECORD_FIELDS if k in status}, **extra}


def _refused(old: dict[str, Any], res: Resolution, st: StatusBuilder) -> Plan:
    """A spec that never validated: the run fails, and nothing is created."""
    st.condition("SpecAccepted", False, res.reason, res.message)
    st.condition("Failed", True, res.reason, res.message)
    st.phase("Failed", res.reason, res.message)
    st.status.completion_time = old.get("completionTime") or st.now
    st.status.finalized = True
    status = st.build()
    return Plan(status=status, record=_new_record(old, status), events=transition_events(old, status))


def _next_phase(
    run: RunView,
    spec: LuffyRunSpec,
    old: dict[str, Any],
    obs: Observed,
    mlflow_run_id: str | None,
    mlflow_delegated: bool,
    st: StatusBuilder,
    plan: Plan,
    extra_egress: Sequence[dict[str, Any]],
) -> Counts:
    """Set the phase and the trainer actions; returns the counts (a failure or disruption just observed counts). A
    Job's annotations are a floor for them: its attempt followed that many restarts and disruptions."""
    job = obs.job
    counts = Counts(
        restarts=max(int(old.get("restarts") or 0), job.restarts if job else 0),
        disruptions=max(int(old.get("disruptions") or 0), job.attempt - job.restarts if job else 0),
    )
    phase = old.get("phase")
    deadline = _deadline(spec, run.created)
    expired = deadline is not None and (
        _time(st.now) >= deadline or (job is not None and job.deadline_exceeded and not job.terminating)
    )
    if phase in TERMINAL_PHASES:
        st.phase(phase, old.get("reason") or phase, old.get("message") or "")
        plan.delete_job = old.get("reason") == DEADLINE_EXCEEDED and job is not None and job.running
    elif expired and not (job is not None and job.complete and not job.terminating):
        assert spec.active_deadline_seconds is not None
        st.phase(
            "Failed",
            DEADLINE_EXCEEDED,
            f"the run passed spec.activeDeadlineSeconds ({spec.active_deadline_seconds}s after its creation at "
            f"{run.created}); the trainer is stopped",
        )
        plan.delete_job = job is not None and job.running
        plan.fail_mlflow_run = mlflow_run_id
    elif _waits_for_admission(spec, obs):
        _queued_phase(spec, obs, st, plan)
    elif job is not None:
        counts = _trainer_phase(spec, old, job, counts, mlflow_run_id, st, plan)
    else:
        left = None if deadline is None else max(1, math.ceil((deadline - _time(st.now)).total_seconds()))
        _admission_phase(run.ref, spec, obs, mlflow_run_id, mlflow_delegated, counts, left, st, plan, extra_egress)
    return counts


DEADLINE_EXCEEDED = "DeadlineExceeded"


def _time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _deadline(spec: LuffyRunSpec, created: str | None) -> datetime.datetime | None:
    """When the run must have finished: spec.activeDeadlineSeconds after its creation (restarts, disruptions and
    suspensions included: the deadline is the run's, not one Job's)."""
    if spec.active_deadline_seconds is None or not created:
        return None
    return _time(created) + datetime.timedelta(seconds=spec.active_deadline_seconds)


def _cleanup_due(spec: LuffyRunSpec, completion_time: str, now: str) -> bool:
    """Whether a finished run's `Delete` cleanup may run: spec.cleanup.delaySeconds after its completion."""
    delay = spec.cleanup.delay_seconds
    return delay == 0 or _time(now) >= _time(completion_time) + datetime.timedelta(seconds=delay)


def _trainer_phase(
    spec: LuffyRunSpec,
    old: dict[str, Any],
    job: JobView,
    counts: Counts,
    mlflow_run_id: str | None,
    st: StatusBuilder,
    plan: Plan,
) -> Counts:
    """The trainer Job exists: it finished, failed (restart or give up), was disrupted (restart uncounted), is going
    away, or runs (stop it on suspend or a rescaled rollout). Returns the counts."""
    max_restarts = spec.failure_policy.max_restarts
    nodes = spec.trainer.nodes
    restarts = counts.restarts
    fresh = job.attempt >= counts.attempt  # its end is not counted yet
    if job.complete and not job.terminating:
        st.phase("Succeeded", "TrainerSucceeded", f"trainer attempt {job.attempt} completed")
    elif job.failed and not job.terminating and fresh and job.disrupted:
        counts = Counts(restarts, counts.disruptions + 1)
        st.phase(
            "Restarting",
            "TrainerDisrupted",
            f"trainer attempt {job.attempt} was disrupted ({job.failure}); restarting from the latest checkpoint, "
            f"not counted toward maxRestarts ({counts.disruptions} disruptions so far)",
        )
    elif job.failed and not job.terminating:
        if fresh and restarts >= max_restarts:
            st.phase(
                "Failed",
                "MaxRestartsExceeded",
                f"trainer attempt {job.attempt} failed ({job.failure}) after {restarts} of {max_restarts} restarts",
            )
            plan.fail_mlflow_run = mlflow_run_id
        elif fresh:
            restarts += 1
            counts = Counts(restarts, counts.disruptions)
            st.phase(
                "Restarting",
                "TrainerFailed",
                f"trainer attempt {job.attempt} failed ({job.failure}); restart {restarts} of {max_restarts} "
                "from the latest checkpoint",
            )
        else:
            plan.delete_job = True
            st.phase("Restarting", old.get("reason") or "TrainerFailed", old.get("message") or "")
    elif job.terminating:
        st.phase(old.get("phase") or "Pending", old.get("reason") or "TrainerStopping", old.get("message") or "")
    elif spec.suspend:
        plan.delete_job = True
        st.phase("Suspended", "Suspended", SUSPENDED_MESSAGE)
    elif spec.uses_rollouts and job.rollout_replicas != spec.rollout.replicas:
        plan.delete_job = True
        st.phase(
            "Restarting",
            "RolloutRescaled",
            f"spec.rollout.replicas is now {spec.rollout.replicas}: restarting the trainer from its checkpoint "
            "with the new rollout endpoints (not counted as a failure)",
        )
    elif job.ready >= nodes:
        st.phase("Running", "TrainerRunning", f"{job.ready}/{nodes} trainer pods ready")
    else:
        st.phase("Pending", "TrainerStarting", f"{job.ready}/{nodes} trainer pods ready")
    return counts


def _waits_for_admission(spec: LuffyRunSpec, obs: Observed) -> bool:
    """With a Kueue queue, a run that is not suspended and whose trainer has not finished runs only while its
    Workload, as the spec sizes it, is admitted."""
    if spec.scheduling.queue_name is None or spec.suspend or (obs.job and (obs.job.complete or obs.job.failed)):
        return False
    view = obs.admission
    return view is None or not view.admitted or view.counts != _pod_set_counts(spec)


def _pod_set_counts(spec: LuffyRunSpec) -> dict[str, int]:
    counts = {kueue.ROLLOUT: spec.rollout.replicas} if spec.uses_rollouts else {}
    return {**counts, kueue.TRAINER: spec.trainer.nodes}


def _queued_phase(spec: LuffyRunSpec, obs: Observed, st: StatusBuilder, plan: Plan) -> None:
    """Not admitted (yet, or any more): nothing that takes quota runs. A running trainer is deleted, so its pods get
    SIGTERM and their grace period to checkpoint; not counted as a restart."""
    view = obs.admission
    queue = spec.scheduling.queue_name
    if obs.job is not None and not obs.job.terminating:
        plan.delete_job = True
    if view is None:
        st.phase("Queued", "Pending", f"creating the Kueue Workload in queue {queue}")
    elif view.counts != _pod_set_counts(spec):
        st.phase("Queued", "WorkloadOutdated", "the pod sets changed with the spec: replacing the Kueue Workload")
    else:
        reason, message = view.reason()
        if view.evicted:
            message = f"evicted by Kueue ({message}): trainer checkpointing and stopping, then queued again"
        st.phase("Queued", reason, message or f"waiting for admission by Kueue queue {queue}")


def _placed(spec: LuffyRunSpec, obs: Observed, manifest: Manifest, pod_set: str) -> Manifest:
    """A workload child with its admission's placement (unchanged without a queue)."""
    view = obs.admission
    if spec.scheduling.queue_name is None or view is None:
        return manifest
    return kueue.placed(manifest, kueue.placement(view, pod_set, obs.flavors))


def _plan_workload(ref: RunRef, spec: LuffyRunSpec, obs: Observed, now: str, st: StatusBuilder, plan: Plan) -> None:
    """The run's Workload: created (before any pod), replaced when the spec resized it, its quota handed back once an
    eviction has stopped every pod, marked Finished with the run; its Kueue conditions mirrored in the run's."""
    view, phase = obs.admission, st.status.phase
    stopped = obs.job is None and obs.rollout is None
    if view is None:
        if phase not in TERMINAL_PHASES:
            rollout = manifests.rollout_statefulset(ref, spec, spec.rollout.replicas) if spec.uses_rollouts else None
            trainer = manifests.trainer_job(ref, spec, 0, None)
            plan.ensure.append(kueue.workload(ref, spec, rollout, trainer, obs.priority))
        return
    for type_ in kueue.KUEUE_CONDITIONS:
        c = view.conditions.get(type_)
        if c is not None:
            st.condition(type_, c.get("status") == "True", str(c.get("reason") or type_), str(c.get("message") or ""))
    assert obs.workload is not None
    if phase in TERMINAL_PHASES:
        if not view.finished:
            plan.workload_status = kueue.finished(obs.workload, phase == "Succeeded", st.status.message or "", now)
    elif view.counts != _pod_set_counts(spec) and stopped:
        plan.delete.append(ObjectKey(kueue.API_VERSION, kueue.WORKLOAD, ref.namespace, view.name))
    elif view.evicted and view.has_admission and stopped:
        plan.workload_status = kueue.released(obs.workload, now)


def _admission_phase(
    ref: RunRef,
    spec: LuffyRunSpec,
    obs: Observed,
    mlflow_run_id: str | None,
    mlflow_delegated: bool,
    counts: Counts,
    deadline_seconds: int | None,
    st: StatusBuilder,
    plan: Plan,
    extra_egress: Sequence[dict[str, Any]],
) -> None:
    """No trainer Job: start one once the run is not suspended, its MLflow run exists (or is the trainer's to
    create) and every rollout replica is ready."""
    rollout = obs.rollout
    if spec.suspend:
        st.phase("Suspended", "Suspended", SUSPENDED_MESSAGE)
    elif spec.mlflow is not None and not mlflow_run_id and not mlflow_delegated:
        st.phase("Pending", "WaitingForMlflow", obs.mlflow.error or "creating the MLflow run")
    elif spec.uses_rollouts and not _rollout_ready(rollout, spec.rollout.replicas):
        ready = rollout.ready if rollout else 0
        st.phase("Pending", "WaitingForRollout", f"{ready}/{spec.rollout.replicas} rollout replicas ready")
    else:
        plan.ensure = manifests.supporting_children(ref, spec, extra_egress)
        job = manifests.trainer_job(
            ref, spec, counts.attempt, mlflow_run_id, restarts=counts.restarts, deadline_seconds=deadline_seconds
        )
        plan.create_job = _placed(spec, obs, job, kueue.TRAINER)
        st.phase("Pending", "TrainerStarting", f"creating the trainer Job (attempt {counts.attempt})")


def _plan_children(
    ref: RunRef,
    spec: LuffyRunSpec,
    obs: Observed,
    desired: int,
    deleting: bool,
    full: bool,
    plan: Plan,
    extra_egress: Sequence[dict[str, Any]],
    queued: bool = False,
) -> None:
    """The rollout at its desired size (none while queued by Kueue), the supporting children kept in line, or the
    workloads removed on cleanup."""
    rollout = obs.rollout
    if spec.uses_rollouts and queued:  # under Kueue the StatefulSet exists only while admitted, placed by it
        if rollout is not None:
            plan.delete.append(ObjectKey("apps/v1", "StatefulSet", ref.namespace, ref.rollout))
    elif spec.uses_rollouts and not deleting:
        if rollout is None:
            plan.ensure = plan.ensure or manifests.supporting_children(ref, spec, extra_egress)
            sts = _placed(spec, obs, manifests.rollout_statefulset(ref, spec, desired), kueue.ROLLOUT)
            plan.ensure.append(sts)
        elif rollout.replicas != desired:
            plan.scale_rollout = desired
    if full and not plan.ensure and not deleting:
        plan.ensure = manifests.supporting_children(ref, spec, extra_egress)
    if deleting and (obs.job is not None or rollout is not None):
        plan.delete = _workload_keys(ref, spec)


def _record_status(
    spec: LuffyRunSpec,
    old: dict[str, Any],
    obs: Observed,
    now: str,
    desired: int,
    deleting: bool,
    counts: Counts,
    mlflow: MlflowStatus | None,
    mlflow_delegated: bool,
    st: StatusBuilder,
) -> None:
    """The conditions and counters of the status, once the phase is decided."""
    job, rollout = obs.job, obs.rollout
    status = st.status
    finished = status.phase in TERMINAL_PHASES
    ready = rollout.ready if rollout else 0
    if spec.uses_rollouts:
        if desired == 0:
            st.condition("RolloutReady", False, "ScaledDown", "rollout scaled to zero")
        else:
            all_ready = _rollout_ready(rollout, desired)
            reason = "AllReplicasReady" if all_ready else "ReplicasNotReady"
            st.condition("RolloutReady", all_ready, reason, f"{ready}/{desired} rollout replicas ready")
    st.condition("TrainerRunning", status.phase == "Running", status.reason, status.message)
    st.condition("Suspended", status.phase == "Suspended", "Suspended" if spec.suspend else "NotSuspended", "")
    if finished:
        st.condition(status.phase, True, status.reason, status.message)

    status.restarts, status.disruptions = counts.restarts, counts.disruptions
    status.rollout = RolloutStatus(desired=desired, ready=ready)
    status.trainer = TrainerStatus(
        attempt=job.attempt if job else counts.attempt,
        active=job.active if job else 0,
        ready=job.ready if job else 0,
        succeeded=job.succeeded if job else 0,
        failed=job.failed_pods if job else 0,
    )
    if mlflow is not None:
        status.mlflow = mlflow
    if status.phase == "Running" and not old.get("startTime"):
        status.start_time = now
    status.completion_time, status.finalized = None, False
    if finished:
        status.completion_time = old.get("completionTime") or now
        scaled_down = rollout is None or (rollout.replicas == 0 and rollout.ready == 0)
        cleaned = not deleting or (job is None and rollout is None)
        model_known = (
            not _wants_model_version(spec)
            or mlflow_delegated  # the operator does not call that server: the version stays unknown here
            or obs.mlflow.model_lookup_done
            or bool(mlflow and mlflow.model_version)
        )
        status.finalized = scaled_down and cleaned and model_known


def _rollout_ready(rollout: RolloutView | None, desired: int) -> bool:
    return rollout is not None and rollout.replicas == desired and rollout.ready >= desired


def _wants_model_version(spec: LuffyRunSpec) -> bool:
    return spec.mlflow is not None and spec.mlflow.registered_model_name is not None


def _mlflow_status(
    spec: LuffyRunSpec, old: dict[str, Any], seen: MlflowView, delegated: str | None, st: StatusBuilder
) -> MlflowStatus | None:
    """status.mlflow and the MlflowReady condition (true also when the trainer is to create the MLflow run)."""
    if spec.mlflow is None:
        return None
    mlflow = dict(old.get("mlflow") or {})
    if seen.run_id:
        mlflow.update(runId=seen.run_id, experimentId=seen.experiment_id, url=seen.url)
    if spec.mlflow.registered_model_name:
        mlflow["modelName"] = spec.mlflow.registered_model_name
    if seen.model_version:
        mlflow["modelVersion"] = seen.model_version
    if seen.error:
        reason = "MlflowUnreachable" if seen.unreachable else "MlflowError"
        st.condition("MlflowReady", False, reason, seen.error)
    elif mlflow.get("runId"):
        st.condition("MlflowReady", True, "RunCreated", f"MLflow run {mlflow['runId']}")
    elif delegated:
        st.condition("MlflowReady", True, "TrainerCreatesRun", delegated)
    else:
        st.condition("MlflowReady", False, "RunNotCreated", "the MLflow run is not created yet")
    return MlflowStatus.model_validate(mlflow)


def needs_model_version(spec: LuffyRunSpec, status: dict[str, Any], job: JobView | None) -> bool:
    """Whether to ask MLflow for the registered model version now (the run has just succeeded, and its MLflow run is
    the operator's). `status` is the record."""
    succeeded = status.get("phase") == "Succeeded" or (job is not None and job.complete)
    known = (status.get("mlflow") or {}).get("modelVersion")
    return succeeded and _wants_model_version(spec) and not known and not status.get(MLFLOW_DELEGATED)


def _progress(spec: LuffyRunSpec, old: dict[str, Any], obs: Observed, st: StatusBuilder) -> int | None:
    """status.progress: the trainer's report if it passes the checks, else the last one that did. Returns the attempt
    the recorded progress came from."""
    attempt = old.get("progressAttempt")
    previous = old.get("progress")
    current = obs.job.attempt if obs.job else None
    report = check_report(spec, obs.progress, current, previous if attempt == current else None)
    if report is not None:
        previous, attempt = report.model_dump(mode="json", by_alias=True, exclude={"attempt"}), report.attempt
    if previous is not None:
        try:
            st.status.progress = ProgressStatus.model_validate(previous)
        except ValidationError:
            return None
    return attempt


def check_report(
    spec: LuffyRunSpec, raw: str | None, attempt: int | None, same_attempt: dict[str, Any] | None
) -> ProgressReport | None:
    """The report if it is well-formed JSON of the contract's model (strict types), from the running attempt,
    bounded (0 <= step <= totalSteps = the spec's, a finite reward, an RFC 3339 time) and not behind what this attempt
    reported before; None otherwise. The trainer may write anything there: nothing else is taken from it."""
    if raw is None or attempt is None or len(raw.encode()) > MAX_PROGRESS_BYTES:
        return None
    try:
        report = ProgressReport.model_validate_json(raw, strict=True)
    except ValidationError:
        return None
    reward = report.reward
    ok = (
        report.attempt == attempt
        and 0 <= report.step <= report.total_steps == spec.optimization.total_steps
        and (reward is None or (math.isfinite(reward) and abs(reward) <= MAX_ABS_REWARD))
        and _is_time(report.updated_time)
        and (same_attempt is None or report.step >= int(same_attempt.get("step") or 0))
    )
    return report if ok else None


def _is_time(value: str | None) -> bool:
    if value is None:
        return True
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return len(value) <= 40


# --- errors ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """Why a pass did not complete. Permanent: the same input fails the same way, so it is not retried until the spec
    changes (or the operator restarts); transient: retried with a growing delay."""

    permanent: bool
    message: str

    @property
    def reason(self) -> str:
        return "PermanentError" if self.permanent else "TransientError"


def reconciled(run: RunView, plan: Plan | None, now: str, failure: Failure | None) -> Plan:
    """The pass's plan (or, when planning raised, one that keeps the cached conditions) with the Reconciled condition,
    a Warning Event for a failure, and a permanent failure's generation in the record (which stops the resync loop)."""
    if plan is None:
        plan = Plan(status={"conditions": run.status.get("conditions") or []}, record=dict(run.record))
    st = StatusBuilder(run.status, now, run.generation)
    if failure is None:
        st.condition("Reconciled", True, "ReconcileSucceeded", "the last reconcile pass completed")
    else:
        st.condition("Reconciled", False, failure.reason, failure.message)
        plan.events.append(Event("Warning", failure.reason, failure.message))
        if failure.permanent:
            plan.record["stalledGeneration"] = run.generation
    (cond,) = st.build()["conditions"]
    plan.status["conditions"] = [c for c in plan.status.get("conditions", []) if c["type"] != "Reconciled"] + [cond]
    return plan
