"""Pure functions from a LuffyRun to the Kubernetes objects it owns. Nothing here talks to an API server.

Children of run `r` in namespace `ns`:
  r-config       ConfigMap      the complete trainer config (/etc/luffy/config.yaml): rollout backend `vllm-server`,
                                the rollout server URLs and the weight-sync address included
  r-progress     ConfigMap      the trainer's progress report (contract.PROGRESS_KEY), read and checked by the operator
  r-rollout      Service        headless; pods r-rollout-<i>.r-rollout.ns.svc serve vLLM on contract.ROLLOUT_PORT
  r-rollout      StatefulSet    `luffy serve-rollout` replicas (startup/readiness/liveness probes on /health)
  r-trainer      Service        headless; r-trainer-0.r-trainer.ns.svc is the torchrun rendezvous and weight-sync host
  r-trainer      Job            Indexed, one pod per node, `torchrun ... -m luffy_trainer.cli train`
  r-control      Secret         the rollout control token (random, made once; mounted as a file by both workloads)
  r-rollout      NetworkPolicy  only the run's trainer pods reach the rollout pods; they reach the run's pods and DNS
  r-trainer      NetworkPolicy  only the run's own pods reach the trainer pods; they reach the run's pods, DNS and the
                                installation's extra egress (MLflow, the API server, a model hub)
  r-trainer      ServiceAccount + Role + RoleBinding: patch of r-progress, nothing else (no LuffyRun access)
  r-checkpoints  PersistentVolumeClaim (unless spec.checkpoint.existingClaim)
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.utils import parse_quantity
from luffy_trainer import contract
from luffy_trainer.config import CheckpointConfig, RolloutConfig, TrackingConfig, TrainConfig, dump_config
from luffy_trainer.contract import API_VERSION, KIND, RENDEZVOUS_PORT, ROLLOUT_PORT

from luffy_operator.api import (
    CHECKPOINT_MOUNT,
    CONFIG_DIR,
    MODEL_CACHE_MOUNT,
    ROLLOUT_RESOURCE_DEFAULTS,
    TRAINER_RESOURCE_DEFAULTS,
    CheckpointSchedule,
    LuffyRunSpec,
    Quantity,
    ResourceRequirements,
    RolloutSampling,
)

Manifest = dict[str, Any]

MANAGER = "luffy-operator"
RUN_LABEL = "luffy.dev/run"
COMPONENT_LABEL = "luffy.dev/component"
ATTEMPT_ANNOTATION = "luffy.dev/attempt"
# The rollout size a trainer Job was started with (its config names that many servers); the operator's record, for
# restarting the trainer when rollout.replicas changes. The trainer reads nothing from it.
ROLLOUT_REPLICAS_ANNOTATION = "luffy.dev/rollout-replicas"
# The restarts counted toward maxRestarts when a trainer Job was made (its attempt minus them: the disruptions before
# it): the operator's floor for both counters, set by the operator only (the trainer cannot write Jobs).
RESTARTS_ANNOTATION = "luffy.dev/restarts"
# The trainer Job's podFailurePolicy rule for disrupted pods (preemption, node drain, node loss: the kubelet or a
# controller sets the DisruptionTarget condition). FailJob, not Ignore: a lone replacement pod cannot rejoin the other
# ranks' NCCL group, so the whole gang stops at once and the Job's Failed condition (reason PodFailurePolicy) names
# this rule's index; the operator then restarts the trainer from its checkpoint without counting a failure. No rule
# on exit codes: torchrun exits 1 for any failed worker, so the code tells nothing apart.
DISRUPTION_RULE = 0
POD_FAILURE_POLICY = {
    "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}],
}

CONFIG_FILE = "config.yaml"
HF_HOME = f"{MODEL_CACHE_MOUNT}/huggingface"
RUN_AS_USER = 1000
PROBE_PERIOD_SECONDS = 10


@dataclass(frozen=True)
class RunRef:
    """The identity of a LuffyRun, enough to name, label and own its children."""

    name: str
    namespace: str
    uid: str

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    @property
    def rollout(self) -> str:
        return f"{self.name}-rollout"

    @property
    def trainer(self) -> str:
        return f"{self.name}-trainer"

    @property
    def checkpoints(self) -> str:
        return f"{self.name}-checkpoints"

    @property
    def control_secret(self) -> str:
        return contract.control_secret_name(self.name)

    def rollout_urls(self, replicas: int) -> list[str]:
        """Base URL of each rollout pod, by its stable StatefulSet DNS name."""
        return [
            f"http://{self.rollout}-{i}.{self.rollout}.{self.namespace}.svc:{ROLLOUT_PORT}" for i in range(replicas)
        ]

    @property
    def trainer_rank0_host(self) -> str:
        """DNS name of trainer rank 0: torchrun's rendezvous and the host rollout pods connect to for weight sync."""
        return f"{self.trainer}-0.{self.trainer}.{self.namespace}.svc"


def labels(run: RunRef, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "luffy",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        RUN_LABEL: run.name,
        COMPONENT_LABEL: component,
    }


def selector(run: RunRef, component: str) -> dict[str, str]:
    return {RUN_LABEL: run.name, COMPONENT_LABEL: component}


def owner_reference(run: RunRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: RunRef, name: str, component: str, owned: bool = True, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": run.namespace, "labels": labels(run, component), **extra}
    if owned:
        meta["ownerReferences"] = [owner_reference(run)]
    return meta


# --- the trainer config ---------------------------------------------------------------------------------------------


def run_directory(run: RunRef, spec: LuffyRunSpec) -> str:
    """This run's directory on the checkpoint volume."""
    return f"{CHECKPOINT_MOUNT}/{spec.checkpoint.sub_path or run.name}"


def train_config(run: RunRef, spec: LuffyRunSpec) -> TrainConfig:
    """The config `luffy train` runs with: the spec's trainer sections plus the paths of the pods, the rollout
    servers' URLs and the address they reach trainer rank 0 at for weight sync. Complete: the environment adds only
    the pod's identity and rank, the MLflow run the operator created, and secrets (trainer_env)."""
    root = run_directory(run, spec)
    tracking = TrackingConfig()
    if spec.mlflow is not None:
        fields = spec.mlflow.model_dump(exclude={"credentials_secret"})
        tracking = TrackingConfig(**{**fields, "run_name": spec.mlflow.run_name or run.name})
    servers: dict[str, Any] = {}
    if spec.uses_rollouts:
        servers = {
            "server_urls": run.rollout_urls(spec.rollout.replicas),
            "control_token_file": contract.CONTROL_TOKEN_FILE,
            "weight_sync_host": run.trainer_rank0_host,
            "weight_sync_port": spec.trainer.weight_sync_port,
        }
    return TrainConfig(
        model=spec.model,
        data=spec.data,
        algorithm=spec.algorithm,
        reward=spec.reward,
        optimization=spec.optimization,
        validation=spec.validation,
        rollout=RolloutConfig(
            backend="vllm-server", **servers, **spec.rollout.model_dump(include=set(RolloutSampling.model_fields))
        ),
        checkpoint=CheckpointConfig(
            dir=f"{root}/checkpoints", **spec.checkpoint.model_dump(include=set(CheckpointSchedule.model_fields))
        ),
        tracking=tracking,
        output_dir=f"{root}/outputs",
    )


def progress_config_map(run: RunRef) -> Manifest:
    """Created empty; the trainer patches its report in. Not kept in line with anything (see mutable_projection)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, contract.progress_config_map(run.name), "progress"),
        "data": {},
    }


def config_map(run: RunRef, spec: LuffyRunSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, run.config_map, "config"),
        "data": {CONFIG_FILE: dump_config(train_config(run, spec))},
    }


# --- the rollout control token -------------------------------------------------------------------------------------


def control_secret(run: RunRef) -> Manifest:
    """The control token's Secret, without its token: `with_control_token` adds one where randomness is allowed
    (the controller), so this function and the plans built from it stay deterministic. Immutable: made once."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(run, run.control_secret, "control"),
        "type": "Opaque",
        "immutable": True,
    }


def with_control_token(secret: Manifest, token: str) -> Manifest:
    out = copy.deepcopy(secret)
    out["data"] = {contract.CONTROL_TOKEN_KEY: base64.b64encode(token.encode()).decode()}
    return out


def is_control_secret(manifest: Manifest) -> bool:
    return manifest["kind"] == "Secret" and manifest["metadata"]["labels"][COMPONENT_LABEL] == "control"


def _control_volume(run: RunRef) -> dict[str, Any]:
    items = [{"key": contract.CONTROL_TOKEN_KEY, "path": contract.CONTROL_TOKEN_KEY}]
    # 0440: readable by the pod's fsGroup (the non-root user), nobody else.
    return {"name": "control-token", "secret": {"secretName": run.control_secret, "items": items, "defaultMode": 0o440}}


def _control_mount() -> dict[str, Any]:
    return {"name": "control-token", "mountPath": contract.CONTROL_TOKEN_DIR, "readOnly": True}


# --- pod building blocks --------------------------------------------------------------------------------------------


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def container_resources(
    requirements: ResourceRequirements,
    defaults: ResourceRequirements,
    gpu_name: str,
    gpus: int,
    scratch: list[Quantity],
) -> dict[str, Any]:
    """Requests and limits that bound every container: cpu and memory the spec names in neither take `defaults`, one
    named only as a request is also the limit and one named only as a limit also the request (as Kubernetes does);
    GPUs are requested as many as limited; ephemeral storage is requested for the disk-backed emptyDirs (`scratch`,
    their size limits), so the scheduler places the pod where they fit."""
    requests, limits = dict(requirements.requests), dict(requirements.limits)
    for name in ("cpu", "memory"):
        if name not in requests and name not in limits:
            requests[name], limits[name] = defaults.requests[name], defaults.limits[name]
        requests.setdefault(name, limits.get(name))
        limits.setdefault(name, requests[name])
    if scratch:
        requests.setdefault("ephemeral-storage", _bytes(sum(parse_quantity(q) for q in scratch)))
    if gpus:
        requests[gpu_name] = limits[gpu_name] = gpus
    return {"requests": requests, "limits": limits}


def _bytes(amount: Any) -> str:
    """A byte count as a quantity, in Gi or Mi when it is a whole number of them."""
    amount = int(amount)
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20)):
        if amount % size == 0:
            return f"{amount // size}{unit}"
    return str(amount)


def _user_env(env: list[Any]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in env]


def _shared_volumes(spec: LuffyRunSpec, shm_limit: Quantity, tmp_limit: Quantity) -> list[dict[str, Any]]:
    """/dev/shm in memory (NCCL and vLLM need more than the runtime's 64Mi; it counts against the memory limit), a
    writable /tmp (the root filesystem is read-only), the model cache and the data volume; every emptyDir bounded."""
    cache: dict[str, Any]
    if spec.model_cache.claim_name:
        cache = {"persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}}
    else:
        cache = {"emptyDir": {"sizeLimit": spec.model_cache.size_limit}}
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_limit}},
        {"name": "tmp", "emptyDir": {"sizeLimit": tmp_limit}},
        {"name": "model-cache", **cache},
    ]
    if spec.data_volume is not None:
        d = spec.data_volume
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": d.claim_name, "readOnly": d.read_only}})
    return volumes


def _scratch(spec: LuffyRunSpec, tmp_limit: Quantity) -> list[Quantity]:
    """Size limits of a pod's emptyDirs on the node's disk: /tmp, and the model cache unless it is a PVC."""
    return [tmp_limit] + ([] if spec.model_cache.claim_name else [spec.model_cache.size_limit])


def _shared_mounts(spec: LuffyRunSpec) -> list[dict[str, Any]]:
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT},
    ]
    if spec.data_volume is not None:
        d = spec.data_volume
        mounts.append({"name": "data", "mountPath": d.mount_path, "readOnly": d.read_only})
    return mounts


def _base_env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _pod_placement(spec: LuffyRunSpec) -> dict[str, Any]:
    s = spec.scheduling
    out: dict[str, Any] = {"securityContext": _pod_security_context()}
    if s.node_selector:
        out["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        out["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in s.tolerations]
    if s.priority_class_name:
        out["priorityClassName"] = s.priority_class_name
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return out


# --- rollout --------------------------------------------------------------------------------------------------------


def rollout_args(spec: LuffyRunSpec) -> list[str]:
    """`luffy serve-rollout` arguments: vLLM settings from the trainer's rollout section, extra args after `--`."""
    r = spec.rollout
    max_model_len = contract.max_model_len(r.max_model_len, spec.data.max_prompt_length, spec.data.max_response_length)
    args = ["serve-rollout", "--model", spec.model.path, "--host", "0.0.0.0", "--port", str(ROLLOUT_PORT)]
    args += ["--control-token-file", contract.CONTROL_TOKEN_FILE]
    args += ["--dtype", spec.model.dtype, "--max-model-len", str(max_model_len)]
    args += ["--tensor-parallel-size", str(r.tensor_parallel_size)]
    if r.gpus_per_replica:
        args += ["--gpu-memory-utilization", str(r.gpu_memory_utilization)]
    extra = (["--enforce-eager"] if r.enforce_eager else []) + list(r.extra_args)
    if spec.model.trust_remote_code:
        extra.append("--trust-remote-code")
    return args + (["--", *extra] if extra else [])


def rollout_service(run: RunRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, run.rollout, "rollout"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(run, "rollout"),
            "ports": [{"name": "http", "port": ROLLOUT_PORT, "targetPort": ROLLOUT_PORT, "protocol": "TCP"}],
        },
    }


def rollout_statefulset(run: RunRef, spec: LuffyRunSpec, replicas: int) -> Manifest:
    r = spec.rollout
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": 5}
    container = {
        "name": "vllm",
        "image": spec.rollout_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["luffy"],
        "args": rollout_args(spec),
        "env": [*_base_env(), {"name": "VLLM_SERVER_DEV_MODE", "value": "1"}, *_user_env(r.env)],
        "ports": [{"name": "http", "containerPort": ROLLOUT_PORT, "protocol": "TCP"}],
        "startupProbe": {
            **probe,
            "failureThreshold": math.ceil(r.startup_timeout_seconds / PROBE_PERIOD_SECONDS),
        },
        "readinessProbe": {**probe, "failureThreshold": 3},
        # After start-up: a replica whose server stops answering for a minute is restarted (vLLM's /health does not
        # wait for the engine, so a long generation or weight update does not fail it).
        "livenessProbe": {**probe, "failureThreshold": 6},
        "resources": container_resources(
            r.resources,
            ROLLOUT_RESOURCE_DEFAULTS,
            spec.scheduling.gpu_resource_name,
            r.gpus_per_replica,
            _scratch(spec, r.tmp_size_limit),
        ),
        "volumeMounts": [*_shared_mounts(spec), _control_mount()],
        "securityContext": _container_security_context(),
    }
    pod_labels = labels(run, "rollout")
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(run, run.rollout, "rollout"),
        "spec": {
            "serviceName": run.rollout,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(run, "rollout")},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    **_pod_placement(spec),
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [*_shared_volumes(spec, r.shm_size_limit, r.tmp_size_limit), _control_volume(run)],
                },
            },
        },
    }


# --- trainer --------------------------------------------------------------------------------------------------------


def weight_sync_ports(spec: LuffyRunSpec) -> list[int]:
    """Ports trainer rank 0 listens on for weight sync, one per rollout replica."""
    return spec.weight_sync_ports if spec.uses_rollouts else []


def trainer_service(run: RunRef, spec: LuffyRunSpec) -> Manifest:
    ports = [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"weight-sync-{i}", "port": p, "targetPort": p, "protocol": "TCP"}
        for i, p in enumerate(weight_sync_ports(spec))
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, run.trainer, "trainer"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(run, "trainer"),
            "ports": ports,
        },
    }


def torchrun_args(run: RunRef, spec: LuffyRunSpec) -> list[str]:
    t = spec.trainer
    return [
        "--nnodes",
        str(t.nodes),
        "--nproc-per-node",
        str(max(t.gpus_per_node, 1)),
        "--node-rank",
        f"$({contract.ENV_NODE_INDEX})",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{run.trainer_rank0_host}:{RENDEZVOUS_PORT}",
        "--rdzv-id",
        run.uid,
        "--max-restarts",
        "0",
        "-m",
        "luffy_trainer.cli",
        "train",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
    ]


def trainer_env(run: RunRef, spec: LuffyRunSpec, mlflow_run_id: str | None) -> list[dict[str, Any]]:
    """What only Kubernetes and the operator's state know: the pod's rank and rendezvous (torchrun's PET_* and
    MASTER_*), its own LuffyRun and attempt for progress reports, the MLflow run and credentials. The rest is in the
    config."""
    t = spec.trainer
    index = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    attempt = {"fieldRef": {"fieldPath": f"metadata.annotations['{ATTEMPT_ANNOTATION}']"}}
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_NODE_INDEX, "valueFrom": index},
        {"name": "PET_NNODES", "value": str(t.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(t.gpus_per_node, 1))},
        {"name": "PET_NODE_RANK", "value": f"$({contract.ENV_NODE_INDEX})"},
        {"name": "PET_MASTER_ADDR", "value": run.trainer_rank0_host},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "MASTER_ADDR", "value": run.trainer_rank0_host},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": contract.ENV_RUN_NAME, "value": run.name},
        {"name": contract.ENV_RUN_NAMESPACE, "value": run.namespace},
        {"name": contract.ENV_ATTEMPT, "valueFrom": attempt},
        *_base_env(),
    ]
    if spec.mlflow is not None:
        m = spec.mlflow
        if mlflow_run_id:
            env.append({"name": contract.ENV_MLFLOW_RUN_ID, "value": mlflow_run_id})
        if m.credentials_secret is not None:
            s = m.credentials_secret
            for var, key in (
                (contract.ENV_MLFLOW_USERNAME, s.username_key),
                (contract.ENV_MLFLOW_PASSWORD, s.password_key),
                (contract.ENV_MLFLOW_TOKEN, s.token_key),
            ):
                ref = {"name": s.name, "key": key, "optional": True}
                env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env + _user_env(t.env)


def trainer_job(
    run: RunRef,
    spec: LuffyRunSpec,
    attempt: int,
    mlflow_run_id: str | None,
    *,
    restarts: int | None = None,
    deadline_seconds: int | None = None,
) -> Manifest:
    """The trainer gang: any failed pod fails the whole Job (backoffLimit 0, a disruption by POD_FAILURE_POLICY); the
    operator then restarts it from the checkpoint, counting restarts (not disruptions) in its record on the LuffyRun's
    metadata so the budget survives Job re-creation. `restarts`: those counted so far (default `attempt`, no
    disruption before); `deadline_seconds`: what is left of spec.activeDeadlineSeconds, so the Job controller stops
    the pods itself when the run's deadline passes."""
    t = spec.trainer
    ports = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"weight-sync-{i}", "containerPort": p, "protocol": "TCP"}
        for i, p in enumerate(weight_sync_ports(spec))
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
        *_shared_mounts(spec),
    ]
    claim = spec.checkpoint.existing_claim or run.checkpoints
    volumes = [
        {"name": "config", "configMap": {"name": run.config_map, "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}},
        *_shared_volumes(spec, t.shm_size_limit, t.tmp_size_limit),
    ]
    if spec.uses_rollouts:
        mounts.append(_control_mount())
        volumes.append(_control_volume(run))
    container = {
        "name": "trainer",
        "image": spec.trainer_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["torchrun"],
        "args": torchrun_args(run, spec),
        "env": trainer_env(run, spec, mlflow_run_id),
        "ports": ports,
        "resources": container_resources(
            t.resources,
            TRAINER_RESOURCE_DEFAULTS,
            spec.scheduling.gpu_resource_name,
            t.gpus_per_node,
            _scratch(spec, t.tmp_size_limit),
        ),
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
    }
    annotations = {
        ATTEMPT_ANNOTATION: str(attempt),
        RESTARTS_ANNOTATION: str(attempt if restarts is None else restarts),
        ROLLOUT_REPLICAS_ANNOTATION: str(spec.rollout.replicas if spec.uses_rollouts else 0),
    }
    deadline = {} if deadline_seconds is None else {"activeDeadlineSeconds": deadline_seconds}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run, run.trainer, "trainer", annotations=annotations),
        "spec": {
            "completionMode": "Indexed",
            "completions": t.nodes,
            "parallelism": t.nodes,
            "backoffLimit": 0,
            "podFailurePolicy": copy.deepcopy(POD_FAILURE_POLICY),
            "podReplacementPolicy": "Failed",  # required with a podFailurePolicy
            **deadline,
            "template": {
                "metadata": {"labels": labels(run, "trainer"), "annotations": {ATTEMPT_ANNOTATION: str(attempt)}},
                "spec": {
                    **_pod_placement(spec),
                    "subdomain": run.trainer,
                    "restartPolicy": "Never",
                    # SIGTERM (deletion, eviction by Kueue, a drain) asks the trainer for a checkpoint: this bounds it.
                    "terminationGracePeriodSeconds": t.termination_grace_period_seconds,
                    # Its token is mounted: the trainer reports progress through its Role (rollout pods mount none).
                    "serviceAccountName": run.trainer,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


# --- network and access ---------------------------------------------------------------------------------------------


# Cloud metadata endpoints (AWS/GCP/Azure IPv4, AWS IPv6): never reachable from a run, whatever the extra egress says.
METADATA_NETWORKS = ("169.254.169.254/32", "fd00:ec2::254/128")
KUBE_DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def _without_metadata(rule: dict[str, Any]) -> dict[str, Any]:
    """An installation's egress rule with every ipBlock that contains a metadata address excepting it."""
    out = copy.deepcopy(rule)
    for peer in out.get("to") or []:
        block = peer.get("ipBlock")
        if block is None:
            continue
        net = ipaddress.ip_network(block["cidr"], strict=False)
        for meta in map(ipaddress.ip_network, METADATA_NETWORKS):
            if meta.version == net.version and meta.subnet_of(net) and str(meta) not in block.get("except", []):
                block["except"] = [*block.get("except", []), str(meta)]
    return out


def _egress(run: RunRef, extra_egress: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's own pods (any port: NCCL), kube-dns, then the installation's rules (`OperatorSettings.run_egress`)."""
    dns_ports = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    return [
        {"to": [{"podSelector": {"matchLabels": {RUN_LABEL: run.name}}}]},
        {"to": [copy.deepcopy(KUBE_DNS_PEER)], "ports": dns_ports},
        *(_without_metadata(rule) for rule in extra_egress),
    ]


def network_policies(run: RunRef, spec: LuffyRunSpec, extra_egress: Sequence[dict[str, Any]] = ()) -> list[Manifest]:
    """Ingress only from the run's own pods, on any port: NCCL (rendezvous, weight sync) opens ephemeral ports on
    both sides after its bootstrap connection, so per-port rules would break it. Egress only to the run's pods,
    kube-dns and what the installation adds (`extra_egress`: MLflow, the API server, a hub), never cloud metadata.
    The selectors are labels the operator sets, which anyone who may create pods here can set too (docs/security.md)."""
    trainer_pods = {"podSelector": {"matchLabels": selector(run, "trainer")}}
    run_pods = {"podSelector": {"matchLabels": {RUN_LABEL: run.name}}}

    def policy(name: str, component: str, ingress_from: dict[str, Any]) -> Manifest:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _metadata(run, name, component),
            "spec": {
                "podSelector": {"matchLabels": selector(run, component)},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [ingress_from]}],
                "egress": _egress(run, extra_egress),
            },
        }

    policies = [policy(run.trainer, "trainer", run_pods)]
    if spec.uses_rollouts:
        policies.append(policy(run.rollout, "rollout", trainer_pods))
    return policies


def trainer_rbac(run: RunRef) -> list[Manifest]:
    """The trainer's identity: it may patch its progress ConfigMap, nothing else. No access to the LuffyRun or its
    status, where the operator keeps what it decides on (restarts, lifecycle)."""
    rules = [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [contract.progress_config_map(run.name)],
            "verbs": ["patch"],
        },
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(run, run.trainer, "trainer")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(run, run.trainer, "trainer"),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(run, run.trainer, "trainer"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": run.trainer},
            "subjects": [{"kind": "ServiceAccount", "name": run.trainer, "namespace": run.namespace}],
        },
    ]


def checkpoint_claim(run: RunRef, spec: LuffyRunSpec) -> Manifest | None:
    """The new checkpoint PVC, or None when the run uses an existing claim. Owned by the run unless retained."""
    c = spec.checkpoint
    if c.existing_claim is not None:
        return None
    claim_spec: dict[str, Any] = {"accessModes": [c.access_mode], "resources": {"requests": {"storage": c.size}}}
    if c.storage_class_name:
        claim_spec["storageClassName"] = c.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(run, run.checkpoints, "checkpoints", owned=not c.retain_claim),
        "spec": claim_spec,
    }


def supporting_children(run: RunRef, spec: LuffyRunSpec, extra_egress: Sequence[dict[str, Any]] = ()) -> list[Manifest]:
    """Everything but the two workloads, in creation order (what a trainer pod needs exists before it starts)."""
    children = [control_secret(run)] if spec.uses_rollouts else []
    children += [config_map(run, spec), progress_config_map(run), trainer_service(run, spec), *trainer_rbac(run)]
    claim = checkpoint_claim(run, spec)
    if claim is not None:
        children.append(claim)
    if spec.uses_rollouts:
        children.append(rollout_service(run))
    return children + network_policies(run, spec, extra_egress)


def mutable_projection(manifest: Manifest) -> dict[str, Any] | None:
    """The part of an existing child the operator keeps in line with the spec (merge patch), None if none.

    Only the trainer config (its rollout server URLs) and the trainer Service's weight-sync ports follow a mutable
    field (rollout.replicas); everything else a child carries derives from immutable spec fields, and the
    StatefulSet's replicas are scaled separately."""
    component = manifest["metadata"]["labels"][COMPONENT_LABEL]
    if manifest["kind"] == "ConfigMap" and component == "config":
        return {"data": manifest["data"]}
    if manifest["kind"] == "Service" and component == "trainer":
        return {"spec": {"ports": manifest["spec"]["ports"]}}
    return None
