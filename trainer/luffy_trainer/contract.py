"""What the operator and the trainer agree on; both wings import it, and the trainer imports nothing of the operator.

Torch-free (pydantic only), because the operator image has no torch. Everything else a trainer pod needs travels in its
config (the ConfigMap holds a complete `TrainConfig`, rollout server URLs and weight-sync address included); the
environment carries what only Kubernetes and the operator's state know: the pod's run and rank, the MLflow run the
operator created, and secrets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# --- the LuffyRun API and the trainer's progress channel -----------------------------------------------------------

GROUP = "luffy.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LuffyRun"
PLURAL = "luffyruns"


class Section(BaseModel):
    """Base of every model both wings share (config sections, LuffyRun spec and status): unknown fields are errors,
    and every field also accepts its camelCase alias, the spelling of Kubernetes manifests."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
        validate_default=True,
    )


class ProgressStatus(Section):
    """Training progress as `status.progress` shows it (dumped by alias); the operator copies it from the trainer's
    progress report once the report passes its checks."""

    step: int = Field(0, description="Last completed training step.")
    total_steps: int = Field(0, description="Steps the run will take.")
    reward: float | None = Field(
        None,
        description=(
            "Mean reward of the last step's advantage groups (MLflow reward/mean): the on-policy samples and, "
            "in mode luffy, the off-policy traces."
        ),
    )
    updated_time: str | None = Field(None, description="When the trainer last reported (RFC 3339).")


class ProgressReport(ProgressStatus):
    """What trainer rank 0 writes into its run's progress ConfigMap (key PROGRESS_KEY, JSON): progress and the attempt
    it belongs to. This channel carries progress only; the operator's decisions never read it."""

    attempt: int = Field(0, ge=0, description="The trainer attempt (its Job's luffy.dev/attempt) that reports.")


# The exit status of a trainer that stopped on SIGTERM after saving its checkpoint (luffy_trainer.preemption):
# EX_TEMPFAIL, "try again later". Not a failure: a resumed run continues from that checkpoint.
PREEMPTED_EXIT_CODE = 75

PROGRESS_KEY = "progress.json"
MAX_PROGRESS_BYTES = 4096  # a longer report is refused by the operator


def progress_config_map(run_name: str) -> str:
    """The ConfigMap the trainer of run `run_name` reports progress into: the only object its Role may patch."""
    return f"{run_name}-progress"


# --- environment variables of trainer pods (a LuffyRun's own env may set none of them) ----------------------------

ENV_RUN_NAME = "LUFFY_RUN_NAME"  # the pod's own LuffyRun, whose progress ConfigMap it reports into
ENV_RUN_NAMESPACE = "LUFFY_RUN_NAMESPACE"
ENV_ATTEMPT = "LUFFY_ATTEMPT"  # the trainer attempt, from its pod's luffy.dev/attempt annotation
ENV_NODE_INDEX = "JOB_COMPLETION_INDEX"  # the trainer pod's index in its Indexed Job: its torchrun node rank
# MLflow's own variables. The operator sets neither of these two (the config's tracking section carries them); outside
# a cluster they override the config.
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_MLFLOW_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
ENV_MLFLOW_RUN_ID = "MLFLOW_RUN_ID"  # the run the operator created, so every restart logs into the same one
# Credentials from the run's Secret, read by the MLflow client itself.
ENV_MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
ENV_MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"

# --- the rollout control token (per run: Secret `<run>-control`, made by the operator, mounted as a file) ---------

CONTROL_SECRET_SUFFIX = "-control"
CONTROL_TOKEN_KEY = "token"  # the Secret's key, and the file's name in the mount
CONTROL_TOKEN_DIR = "/var/run/luffy/control"
CONTROL_TOKEN_FILE = f"{CONTROL_TOKEN_DIR}/{CONTROL_TOKEN_KEY}"  # what `rollout.control_token_file` names in a pod
CONTROL_OPEN_PATHS = ("/health",)  # the only rollout-server routes served without the token (the kubelet's probes)


def control_secret_name(run_name: str) -> str:
    """The Secret holding run `run_name`'s rollout control token."""
    return f"{run_name}{CONTROL_SECRET_SUFFIX}"


# --- registered models: which version the operator reports as the run's model ------------------------------------

MODEL_ARTIFACT_TAG = "luffy.artifact"  # on each model version the trainer registers: the logged model's name
FINAL_MODEL_ARTIFACT = "model"  # outputDir/final, the version `status.mlflow.modelVersion` names
BEST_MODEL_ARTIFACT = "best_model"  # outputDir/best (bestModelAlias), registered after the final one

# --- ports ---------------------------------------------------------------------------------------------------------

ROLLOUT_PORT = 8000  # HTTP port of a rollout server (`luffy serve-rollout`)
RENDEZVOUS_PORT = 29500  # torchrun's rendezvous on trainer rank 0
WEIGHT_SYNC_PORT = 29600  # first weight-sync port on trainer rank 0, see weight_sync_port()


def weight_sync_port(first: int, replica: int) -> int:
    """The port of rollout replica `replica`'s weight-sync group on trainer rank 0: one group, one port per replica."""
    return first + replica


def weight_sync_ports(first: int, replicas: int) -> list[int]:
    """Every port trainer rank 0 listens on for weight sync with `replicas` rollout servers."""
    return [weight_sync_port(first, i) for i in range(replicas)]


# --- derived defaults ----------------------------------------------------------------------------------------------


def max_model_len(configured: int | None, max_prompt_length: int, max_response_length: int) -> int:
    """vLLM's context length: `rollout.max_model_len`, else the longest prompt plus the longest response."""
    return configured or max_prompt_length + max_response_length
