"""Gang admission through Kueue: the run's own Workload, and how to read and act on Kueue's answer. Pure functions.

With `spec.scheduling.queueName` the operator drives one Workload per LuffyRun (`<run>-workload`, owned by it) with
two pod sets, `rollout` (one pod per replica) and `trainer` (one pod per node), carrying the pod templates the
operator would create, so Kueue charges their real requests. The children carry no queue label (Kueue would make a
Workload of each) and are created only once the Workload is `Admitted`, with the assigned ResourceFlavors' node labels
and tolerations (and the admission checks' pod-set updates) merged into their pod templates. On `Evicted` both roles
are stopped (the trainer's pods get SIGTERM and `terminationGracePeriodSeconds` to checkpoint), then the operator hands
the quota back (`QuotaReserved=False`, no admission, `Requeued`) as Kueue's job integrations do; on readmission the
children are created again and the trainer resumes from its latest checkpoint. Why this and not a JobSet or an
AppWrapper: docs/kubernetes.md, "Kueue".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from luffy_operator.api import LuffyRunSpec
from luffy_operator.manifests import Manifest, RunRef, labels, owner_reference

GROUP = "kueue.x-k8s.io"
API_VERSION = f"{GROUP}/v1beta2"
WORKLOAD = "Workload"
RESOURCE_FLAVOR = "ResourceFlavor"
ROLLOUT, TRAINER = "rollout", "trainer"
PODSET_LABEL = f"{GROUP}/podset"
WORKLOAD_ANNOTATION = f"{GROUP}/workload"
TOPOLOGY_GATE = f"{GROUP}/topology"
# Topology-aware scheduling requests on a pod template; copied from the run's pod templates to its pod sets.
TOPOLOGY_ANNOTATIONS = tuple(
    f"{GROUP}/podset-{k}"
    for k in (
        "required-topology",
        "preferred-topology",
        "unconstrained-topology",
        "slice-required-topology",
        "slice-size",
        "group-name",
    )
)
KUEUE_CONDITIONS = ("QuotaReserved", "Admitted", "Evicted")


class PlacementError(ValueError):
    """An admission the operator cannot apply yet (a flavor not found, conflicting updates): retried."""


def workload_name(run: RunRef) -> str:
    return f"{run.name}-workload"


def _pod_set(name: str, count: int, template: dict[str, Any]) -> dict[str, Any]:
    """A pod set from a child's pod template: Kueue keeps only labels and annotations of its metadata."""
    md = template.get("metadata") or {}
    annotations = {k: v for k, v in (md.get("annotations") or {}).items() if k in TOPOLOGY_ANNOTATIONS}
    meta: dict[str, Any] = {"labels": dict(md.get("labels") or {})}
    if annotations:
        meta["annotations"] = annotations
    return {"name": name, "count": count, "template": {"metadata": meta, "spec": copy.deepcopy(template["spec"])}}


def workload(
    run: RunRef, spec: LuffyRunSpec, rollout: Manifest | None, trainer: Manifest, priority: int | None
) -> Manifest:
    """The run's Workload: pod sets `rollout` (spec.rollout.replicas pods of the StatefulSet's template; none without
    rollouts) and `trainer` (spec.trainer.nodes pods of the Job's template); the PriorityClass and its value, read by
    the caller, passed through."""
    assert spec.scheduling.queue_name is not None
    pod_sets = []
    if rollout is not None:
        pod_sets.append(_pod_set(ROLLOUT, spec.rollout.replicas, rollout["spec"]["template"]))
    pod_sets.append(_pod_set(TRAINER, spec.trainer.nodes, trainer["spec"]["template"]))
    body: dict[str, Any] = {"queueName": spec.scheduling.queue_name, "podSets": pod_sets}
    if spec.scheduling.priority_class_name:
        ref = {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": spec.scheduling.priority_class_name}
        body["priorityClassRef"] = ref
        if priority is not None:
            body["priority"] = priority
    meta = {
        "name": workload_name(run),
        "namespace": run.namespace,
        "labels": {**labels(run, "workload"), f"{GROUP}/job-uid": run.uid},
        "ownerReferences": [owner_reference(run)],
    }
    return {"apiVersion": API_VERSION, "kind": WORKLOAD, "metadata": meta, "spec": body}


@dataclass(frozen=True)
class Placement:
    """What an admission adds to one pod set's template."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    topology_gate: bool = False


@dataclass(frozen=True)
class WorkloadView:
    """Kueue's answer as far as decisions need it."""

    name: str
    counts: dict[str, int]  # pod set -> count, as created
    conditions: dict[str, dict[str, Any]]  # type -> condition
    assignments: dict[str, dict[str, Any]]  # pod set -> status.admission.podSetAssignments entry
    updates: dict[str, list[dict[str, Any]]]  # pod set -> podSetUpdates of the admission checks
    finished: bool

    @classmethod
    def of(cls, obj: dict[str, Any]) -> WorkloadView:
        status = obj.get("status") or {}
        admission = status.get("admission") or {}
        updates: dict[str, list[dict[str, Any]]] = {}
        for check in status.get("admissionChecks") or []:
            for update in check.get("podSetUpdates") or []:
                updates.setdefault(update.get("name", ""), []).append(update)
        return cls(
            name=obj["metadata"]["name"],
            counts={p["name"]: int(p.get("count", 1)) for p in (obj.get("spec") or {}).get("podSets") or []},
            conditions={c["type"]: c for c in status.get("conditions") or [] if "type" in c},
            assignments={a["name"]: a for a in admission.get("podSetAssignments") or [] if "name" in a},
            updates=updates,
            finished=_true(status, "Finished"),
        )

    def holds(self, type_: str) -> bool:
        return self.conditions.get(type_, {}).get("status") == "True"

    @property
    def admitted(self) -> bool:
        """Start only on this: quota reserved and every admission check ready, and no eviction under way."""
        return self.holds("Admitted") and self.holds("QuotaReserved") and not self.holds("Evicted")

    @property
    def evicted(self) -> bool:
        return self.holds("Evicted")

    @property
    def has_admission(self) -> bool:
        """Quota is still charged to the run: the operator releases it once its pods are gone."""
        return bool(self.assignments) or self.holds("QuotaReserved")

    def flavors(self) -> set[str]:
        """Every ResourceFlavor named by the admission."""
        return {f for a in self.assignments.values() for f in (a.get("flavors") or {}).values()}

    def reason(self) -> tuple[str, str]:
        """Why the run is not admitted: the eviction's reason, else the QuotaReserved or Admitted one."""
        for type_ in ("Evicted", "QuotaReserved", "Admitted"):
            c = self.conditions.get(type_)
            if c and (c.get("status") == "True") == (type_ == "Evicted"):
                return str(c.get("reason") or type_), str(c.get("message") or "")
        return "Pending", "waiting for Kueue to reserve quota"


def _true(status: dict[str, Any], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or [])


def placement(view: WorkloadView, pod_set: str, flavors: dict[str, dict[str, Any]]) -> Placement:
    """The node labels and tolerations of the flavors assigned to `pod_set` (`flavors`: name -> ResourceFlavor), the
    admission checks' pod-set updates, the pod-set label, and with a topology assignment the TAS annotation and gate.
    A flavor the caller could not read is an error: starting pods without its placement would put them anywhere."""
    assignment = view.assignments.get(pod_set) or {}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for name in sorted(set((assignment.get("flavors") or {}).values())):
        if name not in flavors:
            raise PlacementError(f"ResourceFlavor {name} assigned to pod set {pod_set} was not found")
        flavor_spec = flavors[name].get("spec") or {}
        node_selector.update(flavor_spec.get("nodeLabels") or {})
        tolerations += [t for t in flavor_spec.get("tolerations") or [] if t not in tolerations]
    labels = {PODSET_LABEL: pod_set}
    annotations: dict[str, str] = {}
    for update in view.updates.get(pod_set, []):
        for target, extra in ((node_selector, update.get("nodeSelector")), (labels, update.get("labels"))):
            for key, value in (extra or {}).items():
                if target.get(key, value) != value:
                    raise PlacementError(
                        f"admission check sets {key}={value} on pod set {pod_set}, already {target[key]}"
                    )
                target[key] = value
        annotations.update(update.get("annotations") or {})
        tolerations += [t for t in update.get("tolerations") or [] if t not in tolerations]
    topology = bool(assignment.get("topologyAssignment"))
    if topology:
        annotations[WORKLOAD_ANNOTATION] = view.name
    return Placement(node_selector, tolerations, labels, annotations, topology)


def placed(manifest: Manifest, where: Placement) -> Manifest:
    """A StatefulSet or Job with the admission's placement merged into its pod template (the spec's own node
    selector and tolerations kept; Kueue's flavors add to them)."""
    out = copy.deepcopy(manifest)
    template = out["spec"]["template"]
    md = template.setdefault("metadata", {})
    md["labels"] = {**(md.get("labels") or {}), **where.labels}
    if where.annotations:
        md["annotations"] = {**(md.get("annotations") or {}), **where.annotations}
    pod = template["spec"]
    if where.node_selector:
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **where.node_selector}
    if where.tolerations:
        pod["tolerations"] = [*(pod.get("tolerations") or []), *where.tolerations]
    if where.topology_gate:
        pod["schedulingGates"] = [*(pod.get("schedulingGates") or []), {"name": TOPOLOGY_GATE}]
    return out


def released(obj: dict[str, Any], now: str) -> dict[str, Any]:
    """The status patch that hands an evicted Workload's quota back once the run's pods are gone (what Kueue's job
    integrations write): no admission, QuotaReserved and Admitted false, Requeued (true unless it was deactivated)."""
    status = obj.get("status") or {}
    evicted = next((c for c in status.get("conditions") or [] if c.get("type") == "Evicted"), {})
    requeue = evicted.get("reason") != "Deactivated" and (obj.get("spec") or {}).get("active", True) is not False
    generation = int(obj["metadata"].get("generation") or 0)
    changes = {
        "QuotaReserved": ("False", "Pending", "the run's pods stopped after the eviction"),
        "Admitted": ("False", "NoReservation", "the run's pods stopped after the eviction"),
        "Requeued": ("True" if requeue else "False", str(evicted.get("reason") or "Evicted"), "pods stopped"),
    }
    return {"status": {"admission": None, "conditions": _with_conditions(status, changes, now, generation)}}


def finished(obj: dict[str, Any], succeeded: bool, message: str, now: str) -> dict[str, Any]:
    """The status patch marking the Workload Finished when the run is, so Kueue frees its quota."""
    status = obj.get("status") or {}
    generation = int(obj["metadata"].get("generation") or 0)
    change = {"Finished": ("True", "Succeeded" if succeeded else "Failed", message[:1000])}
    return {"status": {"conditions": _with_conditions(status, change, now, generation)}}


def _with_conditions(
    status: dict[str, Any], changes: dict[str, tuple[str, str, str]], now: str, generation: int
) -> list[dict[str, Any]]:
    """The Workload's conditions with `changes` (type -> status, reason, message) applied; a merge patch replaces the
    whole list, so the others are kept as they are."""
    out = []
    for c in status.get("conditions") or []:
        if c.get("type") not in changes:
            out.append(c)
    for type_, (value, reason, message) in changes.items():
        previous = next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})
        moved = previous.get("status") != value
        out.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now if moved else previous.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        )
    return out
