"""The LuffyRun API (`luffy.dev/v1alpha1`): spec and status models, the source of the CRD in `crds/`.

The spec embeds the trainer's own config sections from `luffy_trainer.config` (model, data, algorithm, reward,
optimization, validation, and the sampling part of rollout / checkpoint / tracking), so a LuffyRun is validated by the
same models `luffy train` uses. Everything Kubernetes-facing is camelCase (the models' aliases); dump with
`by_alias=True` for manifests.

Only `suspend`, `rollout.replicas`, `failurePolicy` and `cleanup` may change after creation (`MUTABLE_PATHS`); the CRD
enforces that with CEL rules and the operator refuses such changes with a condition where no API server did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from luffy_trainer import contract
from luffy_trainer.config import (
    INT64_MAX,
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizationConfig,
    RewardConfig,
    RolloutConfig,
    RuleError,
    TrackingConfig,
    ValidationConfig,
    format_validation_error,
)
from luffy_trainer.contract import API_VERSION, KIND, ProgressStatus, Section
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_snake

from luffy_operator.fields import (
    REQUESTS_WITHIN_LIMITS,
    Cel,
    ConfigKey,
    EnvName,
    HttpUrl,
    ImageReference,
    K8sName,
    LabelMap,
    LabelValue,
    QualifiedName,
    Quantity,
    QueueName,
    ResourceMap,
    cel_rules,
    requests_within_limits,
)

SINGULAR = "luffyrun"
SHORT_NAMES = ["lr"]
CATEGORIES = ["luffy", "all"]

# A run's name becomes DNS names of its pods (`<run>-rollout-12.<run>-rollout`), hence an RFC 1035 label, short.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# Spec fields (camelCase paths below `spec`) that may change while a run exists; everything else is immutable.
MUTABLE_PATHS: tuple[tuple[str, ...], ...] = (
    ("suspend",),
    ("rollout", "replicas"),
    ("failurePolicy",),
    ("cleanup",),
)

# Fields the trainer config defaults but a LuffyRun must state: a pod has no sensible default model or data path.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("path",),
    "data": ("trainFiles",),
}

# Environment variables the operator sets itself; a user's `env` may not override them.
RESERVED_ENV_NAMES = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        contract.ENV_NODE_INDEX,
        "HF_HOME",
        "HOME",
        "VLLM_SERVER_DEV_MODE",
        contract.ENV_MLFLOW_TRACKING_URI,
        contract.ENV_MLFLOW_EXPERIMENT_NAME,
        contract.ENV_MLFLOW_RUN_ID,
        contract.ENV_MLFLOW_USERNAME,
        contract.ENV_MLFLOW_PASSWORD,
        contract.ENV_MLFLOW_TOKEN,
        "PYTHONUNBUFFERED",
    }
)
RESERVED_ENV_PREFIXES = ("LUFFY_", "PET_")

# Where the operator mounts its own volumes in every pod; a data volume may not go over, under or onto them.
CONFIG_DIR = "/etc/luffy"
CHECKPOINT_MOUNT = "/checkpoints"
MODEL_CACHE_MOUNT = "/models"
OPERATOR_MOUNTS = (CONFIG_DIR, CHECKPOINT_MOUNT, MODEL_CACHE_MOUNT, "/tmp", "/dev/shm", contract.CONTROL_TOKEN_DIR)

# `vllm serve` flags the operator or `luffy serve-rollout` sets (superset of serve.RESERVED_VLLM_ARGS); an extra
# argument repeating one would silently override it (`--trust-remote-code` would bypass model.trustRemoteCode).
# vLLM reads `_` and `-` alike in flag names, and `--no-<flag>` for a boolean one.
MANAGED_ROLLOUT_FLAGS = (
    "model",
    "host",
    "port",
    "served-model-name",
    "worker-extension-cls",
    "dtype",
    "max-model-len",
    "tensor-parallel-size",
    "gpu-memory-utilization",
    "logprobs-mode",
    "max-logprobs",
    "enforce-eager",
    "trust-remote-code",
    "api-key",  # serve-rollout gives vLLM the run's control token as its API key
)
MANAGED_FLAG = "^(--(no[-_])?(" + "|".join(f.replace("-", "[-_]") for f in MANAGED_ROLLOUT_FLAGS) + ")|-tp)(=.*)?$"


def _unmanaged_flag(arg: str) -> str:
    if re.fullmatch(MANAGED_FLAG, arg):
        raise ValueError(f"{arg.split('=', 1)[0]} is set by the operator from the spec; use the spec field instead")
    return arg


ExtraArg = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    AfterValidator(_unmanaged_flag),
    Cel(f"!self.matches({MANAGED_FLAG!r})", "overrides a flag the operator sets from the spec"),
]


def _own_mount(path: str) -> str:
    if ".." in path.split("/"):
        raise ValueError(f"{path!r} must be an absolute path without '..'")
    for owned in OPERATOR_MOUNTS:
        if path == owned or path.startswith(owned + "/") or owned.startswith(path + "/"):
            raise ValueError(f"{path!r} overlaps {owned}, which the operator mounts")
    return path


def _mount_rule() -> Cel:
    overlaps = " || ".join(
        f"self == '{m}' || self.startsWith('{m}/') || '{m}'.startsWith(self + '/')" for m in OPERATOR_MOUNTS
    )
    return Cel(
        f"!(self.contains('/../') || self.endsWith('/..') || {overlaps})",
        f"must be an absolute path without '..' that does not overlap {', '.join(OPERATOR_MOUNTS)}",
    )


MountPath = Annotated[
    str, Field(min_length=2, max_length=253, pattern=r"^/[^:\s]*[^/:\s]$"), AfterValidator(_own_mount), _mount_rule()
]


class SpecError(ValueError):
    """A LuffyRun spec the operator cannot run; the message names each offending field as `spec.<path>`."""


def derived_section(base: type[Section], name: str, doc: str, exclude: set[str]) -> type[Section]:
    """A section with the trainer's own field definitions of `base`, less those the operator sets itself."""
    fields: dict[str, Any] = {
        key: (info.annotation, info) for key, info in base.model_fields.items() if key not in exclude
    }
    return create_model(name, __base__=Section, __doc__=doc, **fields)


RolloutSampling = derived_section(
    RolloutConfig,
    "RolloutSampling",
    "How on-policy completions are sampled (the trainer's rollout settings).",
    exclude={"backend", "server_urls", "control_token_file", "weight_sync_host", "weight_sync_port"},
)
CheckpointSchedule = derived_section(
    CheckpointConfig,
    "CheckpointSchedule",
    "How often the training state is saved and whether a restart resumes from it.",
    exclude={"dir"},
)


# --- Kubernetes building blocks -------------------------------------------------------------------------------------


class ResourceRequirements(Section):
    """CPU, memory and other resources of one container (GPUs are set by the GPU count fields, not here)."""

    model_config = ConfigDict(json_schema_extra=cel_rules(REQUESTS_WITHIN_LIMITS))

    requests: ResourceMap = Field(default_factory=dict, description="Minimum resources, e.g. cpu: 8.")
    limits: ResourceMap = Field(default_factory=dict, description="Maximum resources, e.g. memory: 64Gi.")

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceRequirements:
        requests_within_limits(self.requests, self.limits)
        return self


class KeyReference(Section):
    """One key of a Secret or ConfigMap in the run's namespace."""

    name: K8sName = Field(description="Name of the Secret or ConfigMap.")
    key: ConfigKey = Field(description="Key inside it.")
    optional: bool = Field(False, description="Start the pod even if the key is missing.")


class EnvVarSource(Section):
    """Where an environment variable's value comes from."""

    secret_key_ref: KeyReference | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeyReference | None = Field(None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef and configMapKeyRef")
        return self


class EnvVar(Section):
    """An extra environment variable of the run's containers (e.g. HF_TOKEN from a Secret, NCCL settings)."""

    name: EnvName = Field(description="Variable name.")
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(None, description="Value read from a Secret or ConfigMap key.")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"{name} is set by the operator and cannot be overridden")
        return name

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class Toleration(Section):
    """A Kubernetes toleration, e.g. for the taint on GPU nodes."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            Cel("has(self.key) || self.operator == 'Exists'", "must be Exists when key is empty", ".operator"),
            Cel(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "must be empty with operator Exists",
                ".value",
            ),
            Cel(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "needs effect NoExecute",
                ".tolerationSeconds",
            ),
        )
    )

    key: QualifiedName | None = Field(None, description="Taint key; empty with operator Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="How the value is compared.")
    value: LabelValue | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=-INT64_MAX - 1, le=INT64_MAX, description="How long a NoExecute taint is tolerated."
    )

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise RuleError("operator", "must be Exists when key is empty")
        if self.operator == "Exists" and self.value:
            raise RuleError("value", "must be empty with operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise RuleError("toleration_seconds", "needs effect NoExecute")
        return self


EnvList = Annotated[list[EnvVar], Field(max_length=64)]

# cpu and memory of a container whose spec names them in neither requests nor limits (manifests.container_resources).
ROLLOUT_RESOURCE_DEFAULTS = ResourceRequirements(
    requests={"cpu": "4", "memory": "32Gi"}, limits={"cpu": "8", "memory": "32Gi"}
)
TRAINER_RESOURCE_DEFAULTS = ResourceRequirements(
    requests={"cpu": "8", "memory": "64Gi"}, limits={"cpu": "16", "memory": "64Gi"}
)
RESOURCES_DOC = (
    "Requests and limits of the container. cpu or memory named in neither takes the default ({}); one named only as a "
    "request is also the limit, one named only as a limit also the request. A memory-backed /dev/shm counts against "
    "the memory limit."
)


def _describe(defaults: ResourceRequirements) -> str:
    return ", ".join(f"{name} {defaults.requests[name]}/{defaults.limits[name]}" for name in ("cpu", "memory"))


TMP_DOC = "Size limit of the /tmp emptyDir (HOME: the caches of vLLM, torch.compile and Triton); on the node's disk."


# --- spec sections --------------------------------------------------------------------------------------------------


class RolloutSpec(RolloutSampling):
    """The rollout servers: a StatefulSet of `vllm serve` replicas with luffy's weight-sync extension."""

    replicas: int = Field(1, ge=1, le=64, description="Number of vLLM servers. Changing it restarts the trainer.")
    gpus_per_replica: int = Field(
        1, ge=0, le=16, description="GPUs per server (a multiple of tensorParallelSize); 0 runs vLLM on CPU."
    )
    image: ImageReference | None = Field(None, description="Image override; default spec.image.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description=RESOURCES_DOC.format(_describe(ROLLOUT_RESOURCE_DEFAULTS))
    )
    env: EnvList = Field(default_factory=list, description="Extra environment variables.")
    shm_size_limit: Quantity = Field("8Gi", description="Size limit of the memory-backed /dev/shm.")
    tmp_size_limit: Quantity = Field("16Gi", description=TMP_DOC)
    extra_args: list[ExtraArg] = Field(
        default_factory=list, max_length=64, description="Extra `vllm serve` arguments, passed after `--`."
    )
    startup_timeout_seconds: int = Field(
        1800, ge=60, le=86400, description="How long a server may take to load its model before it is restarted."
    )

    @model_validator(mode="after")
    def _tensor_parallel_fits(self) -> RolloutSpec:
        if self.gpus_per_replica and self.gpus_per_replica % self.tensor_parallel_size:
            raise RuleError(
                "tensor_parallel_size",
                f"{self.tensor_parallel_size} must divide gpusPerReplica ({self.gpus_per_replica})",
            )
        return self


class TrainerSpec(Section):
    """The trainer: an Indexed Job of torchrun ranks, one pod per node."""

    nodes: int = Field(1, ge=1, le=64, description="Trainer pods (torchrun nodes).")
    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs (torchrun processes) per pod; 0 trains on CPU.")
    image: ImageReference | None = Field(None, description="Image override; default spec.image.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description=RESOURCES_DOC.format(_describe(TRAINER_RESOURCE_DEFAULTS))
    )
    env: EnvList = Field(default_factory=list, description="Extra environment variables.")
    shm_size_limit: Quantity = Field("16Gi", description="Size limit of the memory-backed /dev/shm.")
    tmp_size_limit: Quantity = Field("16Gi", description=TMP_DOC)
    weight_sync_port: int = Field(
        contract.WEIGHT_SYNC_PORT,
        ge=1024,
        le=65000,
        description="First port of the weight-sync groups on trainer rank 0 (one per rollout replica).",
    )
    termination_grace_period_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description=(
            "How long a trainer pod told to stop (SIGTERM: eviction by Kueue, a drain, a deletion) may take to save "
            "its checkpoint before it is killed."
        ),
    )


class CheckpointSpec(CheckpointSchedule):
    """Checkpoint storage: a new PersistentVolumeClaim (size) or an existing one (existingClaim), mounted at
    /checkpoints; the run writes below /checkpoints/<subPath>."""

    existing_claim: K8sName | None = Field(None, description="Use this PVC instead of creating one.")
    size: Quantity | None = Field(None, description="Size of the PVC the operator creates, e.g. 500Gi.")
    storage_class_name: K8sName | None = Field(None, description="StorageClass of the new PVC.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteOnce", description="Access mode of the new PVC; several trainer nodes need ReadWriteMany."
    )
    retain_claim: bool = Field(False, description="Keep the new PVC when the LuffyRun is deleted.")
    sub_path: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[A-Za-z0-9][-._A-Za-z0-9]*$",
        description="Directory of this run on the volume; default the run's name.",
    )

    @model_validator(mode="after")
    def _one_volume(self) -> CheckpointSpec:
        if (self.existing_claim is None) == (self.size is None):
            raise ValueError("set exactly one of existingClaim and size")
        return self


class SecretReference(Section):
    """MLflow credentials in a Secret of the run's namespace; keys that are missing are skipped."""

    name: K8sName = Field(description="Secret name.")
    username_key: ConfigKey = Field("username", description="Key of MLFLOW_TRACKING_USERNAME.")
    password_key: ConfigKey = Field("password", description="Key of MLFLOW_TRACKING_PASSWORD.")
    token_key: ConfigKey = Field("token", description="Key of MLFLOW_TRACKING_TOKEN.")


class MlflowSpec(TrackingConfig):
    """MLflow tracking. The operator creates the run, so every trainer restart continues the same one; where the
    server refuses the operator (401/403), the trainer creates it and keeps its id in the checkpoints."""

    tracking_uri: HttpUrl = Field(
        description="http(s) URL of the MLflow tracking server: host, optional port and path, no credentials."
    )
    credentials_secret: SecretReference | None = Field(
        None,
        description=(
            "Secret of the run's namespace with the MLflow credentials, passed to the trainer pods only, by "
            "secretKeyRef (so the access of whoever may create those pods decides). The operator never reads it: "
            "its own MLflow calls use the installation's credentials, sent only to the installation's server."
        ),
    )


class FailurePolicy(Section):
    """What happens when the trainer fails."""

    max_restarts: int = Field(
        3, ge=0, le=100, description="Restarts of the whole trainer from its latest checkpoint before the run fails."
    )


CleanupAction = Literal["Keep", "Delete"]


MAX_LIFETIME_SECONDS = 366 * 24 * 3600  # a bound on the run's deadline and cleanup delay: a year


class CleanupPolicy(Section):
    """What happens to the workloads of a finished run. The rollout is scaled to zero either way; `Delete` also
    removes the trainer Job, the StatefulSet, Services, NetworkPolicies and RBAC (the ConfigMap and PVC stay)."""

    on_success: CleanupAction = Field("Keep", description="After the trainer succeeded.")
    on_failure: CleanupAction = Field("Keep", description="After the run failed (pods kept for their logs).")
    delay_seconds: int = Field(
        0,
        ge=0,
        le=MAX_LIFETIME_SECONDS,
        description=(
            "Seconds after completionTime before a `Delete` runs (the trainer's pods stay that long for their logs); "
            "the operator enforces it, as a Job's ttlSecondsAfterFinished would."
        ),
    )


class SchedulingSpec(Section):
    """Where the run's pods go: node selection, taints, priority and the Kueue queue."""

    node_selector: LabelMap = Field(default_factory=dict, description="Node labels every pod requires.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerated taints.")
    priority_class_name: K8sName | None = Field(None, description="PriorityClass of the pods.")
    queue_name: QueueName | None = Field(
        None,
        description=(
            "Kueue LocalQueue: the run is admitted as one Workload (rollout and trainer pods together) and its pods "
            "start only once Kueue admits it."
        ),
    )
    gpu_resource_name: QualifiedName = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")


class ModelCacheSpec(Section):
    """Where downloaded model weights live (HF_HOME=/models/huggingface): an existing PVC shared by the run's pods,
    or a per-pod emptyDir."""

    claim_name: K8sName | None = Field(None, description="Existing PVC; default an emptyDir per pod.")
    size_limit: Quantity = Field(
        "100Gi", description="Size limit of the per-pod emptyDir (on the node's disk; a 7B model is about 15 GB)."
    )


class DataVolumeSpec(Section):
    """An existing PVC with training data and/or model weights, mounted into the trainer and rollout pods (pods on
    several nodes need a ReadOnlyMany or ReadWriteMany volume)."""

    claim_name: K8sName = Field(description="PVC name.")
    mount_path: MountPath = Field("/data", description="Where it is mounted (not over the operator's own mounts).")
    read_only: bool = Field(True, description="Mount read-only.")


class LuffyRunSpec(Section):
    """The desired LUFFY training run."""

    image: ImageReference = Field(description="Container image with luffy (trainer and vLLM).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy.")
    image_pull_secrets: list[K8sName] = Field(default_factory=list, max_length=16, description="Pull Secrets.")
    suspend: bool = Field(
        False, description="Stop the trainer and scale the rollout to zero; false resumes from the checkpoint."
    )
    model: ModelConfig = Field(description="The policy model.")
    data: DataConfig = Field(description="Training data (paths inside the trainer pods).")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    checkpoint: CheckpointSpec = Field(description="Checkpoint volume and schedule.")
    mlflow: MlflowSpec | None = Field(None, description="MLflow tracking; without it metrics stay inside the pod.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    cleanup: CleanupPolicy = Field(default_factory=CleanupPolicy)
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_LIFETIME_SECONDS,
        description=(
            "Seconds after its creation the run may take, restarts and suspensions included; past it the trainer is "
            "stopped and the run fails (reason DeadlineExceeded)."
        ),
    )
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)
    data_volume: DataVolumeSpec | None = Field(None, description="Existing PVC with training data or model weights.")

    @model_validator(mode="after")
    def _required_fields(self) -> LuffyRunSpec:
        # After validation, not before: a before-validator would make pydantic re-read the JSON input as Python
        # objects, where strict mode refuses a JSON array for a tuple (optimization.betas).
        for section, keys in REQUIRED_FIELDS.items():
            given = getattr(self, section).model_fields_set
            missing = [k for k in keys if to_snake(k) not in given]
            if missing:
                raise ValueError(f"spec.{section}.{missing[0]}: required in a LuffyRun")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> LuffyRunSpec:
        shared = self.checkpoint.size is None or self.checkpoint.access_mode == "ReadWriteMany"
        if self.trainer.nodes > 1 and not shared:
            raise ValueError("spec.checkpoint.accessMode: must be ReadWriteMany when spec.trainer.nodes > 1")
        if not self.uses_rollouts and self.data.val_files:
            raise ValueError(
                "spec.data.valFiles: mode sft starts no rollout servers to validate with; evaluate with luffy eval"
            )
        gpu = self.scheduling.gpu_resource_name
        for component, count in (("trainer", "gpusPerNode"), ("rollout", "gpusPerReplica")):
            if gpu in getattr(self, component).resources.limits | getattr(self, component).resources.requests:
                raise ValueError(f"spec.{component}.resources: set GPUs with spec.{component}.{count}, not as {gpu}")
        r, d = self.rollout, self.data
        if r.max_model_len is not None and r.max_model_len < d.max_prompt_length + d.max_response_length:
            raise ValueError(
                f"spec.rollout.maxModelLen: {r.max_model_len} must hold spec.data.maxPromptLength + "
                f"maxResponseLength ({d.max_prompt_length + d.max_response_length})"
            )
        if self.uses_rollouts and contract.RENDEZVOUS_PORT in self.weight_sync_ports:
            raise ValueError(
                f"spec.trainer.weightSyncPort: ports {self.weight_sync_ports[0]}-{self.weight_sync_ports[-1]} "
                f"(one per rollout replica) include the rendezvous port {contract.RENDEZVOUS_PORT}"
            )
        return self

    @property
    def weight_sync_ports(self) -> list[int]:
        """Ports trainer rank 0 listens on for weight sync, one per rollout replica."""
        return contract.weight_sync_ports(self.trainer.weight_sync_port, self.rollout.replicas)

    @property
    def uses_rollouts(self) -> bool:
        """Whether the run needs rollout servers (every mode but `sft`)."""
        return self.algorithm.uses_rollouts

    @property
    def rollout_image(self) -> str:
        return self.rollout.image or self.image

    @property
    def trainer_image(self) -> str:
        return self.trainer.image or self.image


# --- status ---------------------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = ("Succeeded", "Failed")


# metav1.Condition's limits (KEP-1623), so `kubectl` and generic tooling read the conditions as they read built-in ones.
MAX_CONDITIONS = 16
MAX_CONDITION_MESSAGE = 32768
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)


class Condition(Section):
    """One aspect of the run's state, in the metav1.Condition schema."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description=(
            "SpecAccepted, MlflowReady, RolloutReady, TrainerRunning, Suspended, Reconciled, Succeeded or Failed; "
            "with a Kueue queue also QuotaReserved, Admitted and Evicted, as the run's Workload has them."
        ),
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase reason of the last transition.",
    )
    message: str = Field("", max_length=MAX_CONDITION_MESSAGE, description="Human-readable detail.")
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"}, description="When status or reason last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        None, ge=0, le=INT64_MAX, description="metadata.generation this condition was computed at."
    )


class RolloutStatus(Section):
    """The rollout servers as last observed."""

    desired: int = Field(0, description="Replicas the operator wants now (0 when suspended or finished).")
    ready: int = Field(0, description="Replicas passing their readiness probe.")


class TrainerStatus(Section):
    """The current trainer Job as last observed."""

    attempt: int = Field(0, description="Which attempt the current Job is (0 first, then one per restart).")
    active: int = Field(0, description="Trainer pods running or starting.")
    ready: int = Field(0, description="Trainer pods ready.")
    succeeded: int = Field(0, description="Trainer pods that finished successfully.")
    failed: int = Field(0, description="Trainer pods that failed in this attempt.")


class MlflowStatus(Section):
    """The MLflow run the operator created for this LuffyRun."""

    run_id: str | None = Field(None, description="MLflow run id (passed to the trainer as MLFLOW_RUN_ID).")
    experiment_id: str | None = Field(None, description="MLflow experiment id.")
    url: str | None = Field(None, description="Link to the run in the MLflow UI.")
    model_name: str | None = Field(None, description="Registered model name.")
    model_version: str | None = Field(None, description="Registered model version produced by this run.")


class LuffyRunStatus(Section):
    """The observed state of a LuffyRun: a cache the operator rewrites on every pass from its own record (metadata
    annotations) and the children; nothing here is read back for a decision."""

    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed.")
    reason: str | None = Field(None, description="Why the run is in this phase (CamelCase).")
    message: str | None = Field(None, description="Human-readable detail of the phase.")
    observed_generation: int | None = Field(None, description="metadata.generation the operator last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=MAX_CONDITIONS, description="Conditions, one per type."
    )
    restarts: int = Field(
        0, description="Trainer restarts after failures so far, toward maxRestarts (counted in the operator's record)."
    )
    disruptions: int = Field(
        0,
        description=(
            "Trainer restarts after disruptions (preemption, node drain: the DisruptionTarget pod condition), not "
            "counted toward maxRestarts."
        ),
    )
    rollout: RolloutStatus = Field(default_factory=RolloutStatus)
    trainer: TrainerStatus = Field(default_factory=TrainerStatus)
    progress: ProgressStatus | None = Field(
        None, description="Training progress: the trainer's last report that passed the operator's checks."
    )
    mlflow: MlflowStatus | None = Field(None, description="The run's MLflow run and registered model.")
    start_time: str | None = Field(None, description="When the trainer first ran (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run succeeded or failed (RFC 3339).")
    finalized: bool = Field(
        False, description="The run has finished and the operator has completed its cleanup; status is final."
    )


class ObjectMeta(BaseModel):
    """The parts of metadata the CRD constrains."""

    name: str = Field(max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN, description="Run name (a DNS label).")


class LuffyRun(BaseModel):
    """A LUFFY training run: vLLM rollout servers plus a torchrun trainer, tracked in MLflow."""

    api_version: str = Field(API_VERSION, alias="apiVersion", description="luffy.dev/v1alpha1")
    kind: str = Field(KIND, description="LuffyRun")
    metadata: ObjectMeta
    spec: LuffyRunSpec
    status: LuffyRunStatus | None = None


# --- helpers on raw objects -----------------------------------------------------------------------------------------


def parse_spec(spec: Any) -> LuffyRunSpec:
    """Validate a raw spec as the API server reads a manifest, raising SpecError with one `spec.<path>: problem` line
    per error: JSON types without coercion (no "8" for 8, no "true" for true) and camelCase keys only (the API server
    would prune a snake_case key and the run would silently get the default)."""
    if not isinstance(spec, dict):
        raise SpecError("spec: must be a mapping")
    try:
        text = json.dumps(spec, allow_nan=False)
    except ValueError:  # the API server cannot even decode such a body
        raise SpecError("spec: numbers must be finite (NaN and Infinity are not JSON)") from None
    try:
        return LuffyRunSpec.model_validate_json(text, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        lines = format_validation_error(err, by_alias=True).splitlines()[1:]
        raise SpecError("invalid spec: " + "; ".join(_prefixed(line.strip()) for line in lines)) from None


def _prefixed(line: str) -> str:
    path, sep, problem = line.partition(": ")
    problem = problem.removeprefix("Value error, ")
    if path == "(top level)":
        return problem if problem.startswith("spec.") else f"spec: {problem}"
    return f"spec.{path}{sep}{problem}"


def check_name(name: str) -> None:
    """A run's name must fit the DNS names derived from it."""
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(NAME_PATTERN, name):
        raise SpecError(
            f"metadata.name: {name!r} must be a lowercase DNS label of at most {MAX_NAME_LENGTH} characters "
            "starting with a letter (it names the run's pods and Services)"
        )


def dump_spec(spec: LuffyRunSpec) -> dict[str, Any]:
    """The spec as Kubernetes spells it (camelCase, JSON types)."""
    return spec.model_dump(mode="json", by_alias=True)


def is_mutable(path: tuple[str, ...]) -> bool:
    return any(path[: len(m)] == m for m in MUTABLE_PATHS)


def immutable_changes(accepted: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`spec.<path>` of every immutable field that differs between two dumped specs."""
    return [f"spec.{'.'.join(p)}" for p in _diff_paths(accepted, current, ()) if not is_mutable(p)]


def _diff_paths(old: Any, new: Any, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff_paths(old.get(key), new.get(key), (*prefix, key))
    elif old != new:
        yield prefix


def with_mutable_fields(accepted: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The accepted spec with the mutable fields taken from the current one (immutable edits refused)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in accepted.items()}
    for path in MUTABLE_PATHS:
        source, target = current, merged
        for key in path[:-1]:
            source = source.get(key, {})
            target = target.setdefault(key, {})
        if path[-1] in source:
            target[path[-1]] = source[path[-1]]
    return merged
