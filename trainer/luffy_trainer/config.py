"""The configuration of a luffy training run.

These pydantic models are the single source of truth for a run: `luffy train` loads them from YAML, the operator
embeds them in the LuffyRun spec (and the CRD schema is generated from them). This module must not import torch or
vllm, because the operator image has neither.

Python fields are snake_case; every field also accepts its camelCase alias, the spelling used in Kubernetes manifests.
Defaults reproduce the released LUFFY main run (Qwen2.5-Math-7B, 8 GPUs); see README "Algorithm" for each choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel, to_snake

from luffy_trainer.contract import WEIGHT_SYNC_PORT, Section

AlgorithmMode = Literal["luffy", "grpo", "sft", "rl_sft_loss"]
Aggregation = Literal["token-sum", "token-mean", "seq-mean-token-mean"]
LossScale = Literal["invariant", "released"]
DataFormat = Literal["luffy", "flat"]
OverlongPolicy = Literal["drop", "error"]
RolloutBackend = Literal["vllm", "vllm-server", "hf"]
WeightSyncBackend = Literal["auto", "gloo", "nccl"]
ModelDType = Literal["float32", "bfloat16", "float16"]
ResumeMode = Literal["auto", "never", "required"]
ImportanceCorrection = Literal["auto", "none", "token", "sequence"]

INT64_MAX = 2**63 - 1
PositiveInt = Annotated[int, Field(ge=1, le=INT64_MAX)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Port = Annotated[int, Field(ge=1, le=65535)]
# Sensible maxima of counts and sizes: far above any real run, low enough that a typo is refused, not attempted.
Steps = Annotated[int, Field(ge=1, le=1_000_000_000)]
Tokens = Annotated[int, Field(ge=1, le=4_194_304)]
SampleCount = Annotated[int, Field(ge=0, le=1024)]
# A value that must say something: not empty, not blank, no leading or trailing whitespace.
NonBlank = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^\S(.*\S)?$")]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class UserError(ValueError):
    """A problem the user fixes (a config, a data file, a server address, a model directory), not a bug: the CLI
    prints its message, which names the field, file or URL, and exits non-zero without a traceback."""


def one_line(exc: BaseException) -> str:
    """A library's (often multi-line) error message on one line, to quote inside a UserError."""
    return " ".join(str(exc).split()) or type(exc).__name__


class RuleError(ValueError):
    """A cross-field rule broken by one field: the error's path ends at that field (`optimization.warmup_steps`),
    not at the section whose validator checks the rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(UserError):
    """A configuration that cannot be loaded; the message names each offending field by its full dotted path."""


class ModelConfig(Section):
    """The policy model to train (a Hugging Face directory or hub id resolvable offline)."""

    path: NonBlank = Field("Elliott/Qwen2.5-Math-7B-16k-think", description="Model directory or Hugging Face id.")
    dtype: ModelDType = Field("bfloat16", description="Parameter dtype for rollout and training.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")


class LuffyColumns(Section):
    """Column names of the released LUFFY/verl parquet schema."""

    prompt: NonBlank = Field("prompt", description="Chat messages of the prompt ([system, user]).")
    target: NonBlank = Field("target", description="The off-policy trace: one assistant message (or a list of them).")
    ground_truth: NonBlank = Field(
        "reward_model.ground_truth", description="Dotted path to the answer inside a struct column."
    )


class FlatColumns(Section):
    """Column names of the flat format: one question, one answer, one worked solution per row."""

    question: NonBlank = Field("question", description="The problem statement.")
    answer: NonBlank = Field("answer", description="The ground-truth final answer.")
    solution: NonBlank = Field("solution", description="A worked solution used as the off-policy trace.")


class DataConfig(Section):
    """Where prompts, answers and off-policy traces come from, and the length limits."""

    train_files: list[NonBlank] = Field(
        default_factory=lambda: ["data/openr1.parquet"],
        min_length=1,
        max_length=1024,
        description="Parquet, JSONL or local `datasets` directories with the training rows.",
    )
    val_files: list[NonBlank] = Field(
        default_factory=list, max_length=1024, description="Validation sets, same formats."
    )
    format: DataFormat = Field("luffy", description="`luffy`: the released verl schema; `flat`: named columns.")
    luffy_columns: LuffyColumns = Field(default_factory=LuffyColumns)
    flat_columns: FlatColumns = Field(default_factory=FlatColumns)
    system_prompt: Annotated[str, Field(max_length=65536)] | None = Field(
        None, description="System message added to flat-format prompts (the luffy format carries its own)."
    )
    max_prompt_length: Tokens = Field(1024, description="Longest templated prompt, in tokens.")
    max_response_length: Tokens = Field(8192, description="Longest response or trace, in tokens (EOS included).")
    overlong_prompt: OverlongPolicy = Field("error", description="What to do with a prompt over the limit.")
    overlong_trace: OverlongPolicy = Field("drop", description="What to do with a row whose trace is over the limit.")
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (seeded, resumable).")


class AlgorithmConfig(Section):
    """The objective: group construction, advantage and policy loss (README "Algorithm")."""

    mode: AlgorithmMode = Field(
        "luffy",
        description=(
            "`luffy`: on-policy + off-policy samples in one group with policy shaping; `grpo`: on-policy only; "
            "`sft`: traces only, NLL loss; `rl_sft_loss`: on-policy GRPO plus the NLL of the trace."
        ),
    )
    n_on_policy: SampleCount = Field(7, description="On-policy samples per prompt.")
    n_off_policy: SampleCount = Field(1, description="Off-policy traces per prompt (luffy mode).")
    gamma: Annotated[float, Field(gt=0.0)] | None = Field(
        0.1, description="Policy shaping f(p) = p/(p+gamma) on off-policy tokens; null means f(p) = p."
    )
    clip_eps: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="PPO clip range of on-policy ratios; null (the released LUFFY run) means no clip."
    )
    normalize_std: bool = Field(False, description="Divide group advantages by the unbiased group std + eps.")
    std_eps: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="Epsilon added to the group std.")
    aggregation: Aggregation = Field("token-sum", description="How token losses are reduced to one scalar.")
    norm_length: Tokens | None = Field(
        None, description="Divisor of `token-sum`; null means data.maxResponseLength (the released constant)."
    )
    loss_scale: LossScale = Field(
        "invariant",
        description=(
            "`invariant`: every term is normalised by totals over the whole mini-batch, so the update does not depend "
            "on the number of ranks or micro-batches; `released`: the released LUFFY code's scaling (per rank, the "
            "policy-gradient token sum / normLength and the entropy and NLL token means of each micro-batch summed "
            "over micro-batches; ranks averaged), to reproduce the paper's run exactly."
        ),
    )
    entropy_coeff: NonNegativeFloat = Field(0.001, description="Weight of the entropy bonus (0 disables it).")
    off_policy_max_clip: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="Upper clamp of the shaped off-policy weight f(p); null disables."
    )
    off_policy_min_clip: NonNegativeFloat | None = Field(
        None, description="Lower clamp of the shaped off-policy weight f(p); null disables."
    )
    sft_loss_coef: NonNegativeFloat = Field(1.0, description="Weight of the trace NLL in `rl_sft_loss` mode.")
    importance_correction: ImportanceCorrection = Field(
        "auto",
        description=(
            "Truncated importance weight min(pi_old / pi_behaviour, importanceCap) on on-policy tokens, pi_behaviour "
            "being the engine's sampling probability: per `token`, or one weight per `sequence` (the product over "
            "its tokens); `none`: no weight; `auto`: `token` when rollout.maxStaleness > 0, else `none`."
        ),
    )
    importance_cap: Annotated[float, Field(gt=0.0)] = Field(
        2.0, description="Upper truncation C of the importance weight of on-policy tokens."
    )

    @model_validator(mode="after")
    def _check_group(self) -> AlgorithmConfig:
        if self.uses_rollouts and self.n_on_policy < 1:
            raise RuleError("n_on_policy", f"must be at least 1 in mode {self.mode!r}")
        if self.uses_traces and self.n_off_policy < 1:
            raise RuleError("n_off_policy", f"must be at least 1 in mode {self.mode!r}")
        if (
            self.off_policy_max_clip is not None
            and self.off_policy_min_clip is not None
            and self.off_policy_min_clip > self.off_policy_max_clip
        ):
            raise RuleError("off_policy_min_clip", "must not exceed the max clip")
        if self.loss_scale == "released" and self.aggregation != "token-sum":
            raise RuleError("loss_scale", f"'released' scales the token-sum aggregation, not {self.aggregation!r}")
        return self

    # What each mode means, asked by the code instead of comparing mode names (the table in groups.py).

    @property
    def uses_rollouts(self) -> bool:
        """Whether this mode samples on-policy completions at all (`sft` does not)."""
        return self.mode != "sft"

    @property
    def uses_traces(self) -> bool:
        """Whether the dataset's off-policy traces are samples of the step (all but `grpo`): the training data must
        carry them, and they are graded."""
        return self.mode != "grpo"

    @property
    def uses_traces_in_group(self) -> bool:
        """Whether off-policy traces join the advantage group, and so the policy-gradient term with policy shaping
        (only `luffy`)."""
        return self.mode == "luffy"

    @property
    def uses_nll(self) -> bool:
        """Whether the traces are trained by their negative log-likelihood (`sft`, `rl_sft_loss`)."""
        return self.mode in ("sft", "rl_sft_loss")

    @property
    def nll_coef(self) -> float:
        """Weight of the NLL term: the whole loss in `sft`, `sft_loss_coef` in `rl_sft_loss`, 0 without the term."""
        if not self.uses_nll:
            return 0.0
        return self.sft_loss_coef if self.mode == "rl_sft_loss" else 1.0

    @property
    def uses_entropy_bonus(self) -> bool:
        """Whether `entropy_coeff` applies: in every mode with a policy-gradient term (not `sft`, an NLL-only loss)."""
        return self.uses_rollouts or self.uses_traces_in_group


class RewardConfig(Section):
    """How completions and traces are scored."""

    name: NonBlank = Field("math_verify", description='A registered reward function (README "Rewards").')
    timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        10.0, description="Longest time one sample may take to grade; a sample over it scores 0."
    )
    num_workers: Annotated[int, Field(ge=1, le=256)] = Field(2, description="Grading worker processes.")


class RolloutConfig(Section):
    """How on-policy completions are sampled."""

    backend: RolloutBackend = Field(
        "vllm", description="`vllm`: in-process engine; `vllm-server`: `vllm serve` replicas; `hf`: transformers."
    )
    server_urls: list[NonBlank] = Field(
        default_factory=list,
        max_length=64,
        description="Base URLs of the rollout servers (backend vllm-server); a LuffyRun's operator writes them.",
    )
    control_token_file: NonBlank | None = Field(
        None,
        description=(
            "File with the rollout servers' control token, sent as `Authorization: Bearer` on every request to them "
            "(backend vllm-server; a LuffyRun's operator mounts it); null: none."
        ),
    )
    weight_sync_host: NonBlank = Field(
        "127.0.0.1", description="Address the rollout servers reach trainer rank 0 at for weight sync."
    )
    weight_sync_port: Port = Field(
        WEIGHT_SYNC_PORT,
        description="First weight-sync port on trainer rank 0; rollout server i connects to this port + i.",
    )
    temperature: NonNegativeFloat = Field(1.0, description="Sampling temperature of on-policy rollouts.")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, ge=-1, le=1_000_000, description="Top-k sampling; -1 disables.")
    max_tokens: Tokens | None = Field(None, description="Longest completion; null means data.maxResponseLength.")
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.8, description="Fraction of GPU memory the in-process vLLM engine may take."
    )
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="Tensor-parallel degree of each vLLM engine."
    )
    enforce_eager: bool = Field(True, description="Disable CUDA graphs / torch.compile in vLLM.")
    max_model_len: Tokens | None = Field(
        None, description="vLLM context length; null means maxPromptLength + maxResponseLength."
    )
    weight_sync_bucket_mb: Annotated[int, Field(ge=1, le=65536)] = Field(
        256, description="Size of each weight-sync broadcast bucket."
    )
    weight_sync_backend: WeightSyncBackend = Field(
        "auto", description="Transport of weight updates to rollout servers; `auto`: nccl with a GPU, else gloo."
    )
    weight_sync_timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        600.0, description="Longest wait for a weight-sync group to form or one update to reach a rollout server."
    )
    max_inflight_requests: Annotated[int, Field(ge=1, le=65536)] = Field(
        64, description="Generation requests (one per prompt) in flight at once across all rollout servers."
    )
    request_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        5, description="Tries per prompt before a batch fails; connection errors and 5xx are retried elsewhere."
    )
    request_timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        1800.0, description="Longest wait for one generation request to a rollout server."
    )
    unhealthy_timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        300.0, description="How long to wait for at least one healthy rollout server before failing."
    )
    max_staleness: Annotated[int, Field(ge=0, le=16)] = Field(
        0,
        description=(
            "k: batch s is generated from the weights after step s-1-k while earlier batches train (0: generate, "
            "then train, in turn; 1: generation of the next batch overlaps training)."
        ),
    )


class OptimizationConfig(Section):
    """Optimizer, batch sizes and schedule."""

    lr: Annotated[float, Field(gt=0.0)] = Field(1e-6, description="AdamW learning rate.")
    weight_decay: NonNegativeFloat = Field(0.01, description="AdamW weight decay.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), validate_default=False, description="AdamW betas.")
    grad_clip: Annotated[float, Field(gt=0.0)] | None = Field(1.0, description="Max global grad norm; null: none.")
    warmup_steps: Annotated[int, Field(ge=0, le=1_000_000_000)] = Field(
        0, description="Linear warmup, in optimizer steps."
    )
    prompts_per_step: Annotated[int, Field(ge=1, le=1_048_576)] = Field(
        128, description="Prompts drawn per rollout batch."
    )
    optimizer_steps_per_batch: Annotated[int, Field(ge=1, le=1_048_576)] = Field(
        2, description="Mini-batches (optimizer steps) each rollout batch is split into."
    )
    micro_batch_tokens: Annotated[int, Field(ge=1, le=1_073_741_824)] = Field(
        32768, description="Token budget of one forward/backward micro-batch (gradients are accumulated)."
    )
    total_steps: Steps = Field(500, description="Rollout batches (training steps) to run.")
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(
        47, description="Seed of the data order, sampling and initialisation."
    )

    @model_validator(mode="after")
    def _check_minibatches(self) -> OptimizationConfig:
        if self.prompts_per_step % self.optimizer_steps_per_batch:
            raise RuleError(
                "prompts_per_step",
                f"{self.prompts_per_step} must be divisible by the optimizer steps per batch "
                f"({self.optimizer_steps_per_batch})",
            )
        if self.warmup_steps > self.total_steps:
            raise RuleError("warmup_steps", f"{self.warmup_steps} must not exceed the total steps ({self.total_steps})")
        return self


class CheckpointConfig(Section):
    """Where and how often the training state is saved."""

    dir: NonBlank = Field("checkpoints", description="Directory of step checkpoints and the final model.")
    every_steps: Steps = Field(50, description="Save a checkpoint every N steps (and at the end).")
    keep_last: Annotated[int, Field(ge=1, le=1000)] = Field(2, description="How many step checkpoints to keep.")
    resume: ResumeMode = Field(
        "auto", description="`auto`: resume from the newest checkpoint if any; `never`; `required`: fail if none."
    )


class TrackingServerConfig(Section):
    """Which MLflow server, experiment and run name; shared by training and `luffy eval`."""

    tracking_uri: NonBlank | None = Field(
        None, description="MLflow server URI; null: a local store in the working dir."
    )
    experiment_name: NonBlank = Field("luffy", description="MLflow experiment.")
    run_name: NonBlank | None = Field(None, description="MLflow run name.")
    connect_timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        120.0, description="How long to retry an unreachable tracking server before failing."
    )


class TrackingConfig(TrackingServerConfig):
    """MLflow tracking. Environment variables MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID win."""

    log_model: bool = Field(True, description="Log the final model as an MLflow transformers model.")
    registered_model_name: NonBlank | None = Field(None, description="Register the final model under this name.")
    registered_model_alias: NonBlank | None = Field(None, description="Alias pointed at the final model's version.")
    best_model_alias: NonBlank | None = Field(
        None,
        description=(
            "Also register the model of the best validation score and point this alias at it "
            "(needs registeredModelName and data.valFiles)."
        ),
    )
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics.")
    log_every_steps: Steps = Field(1, description="Log step metrics every N steps.")

    @model_validator(mode="after")
    def _check_best_model(self) -> TrackingConfig:
        if self.best_model_alias is not None and self.registered_model_name is None:
            raise RuleError("best_model_alias", "needs a registered model name (the model the alias points into)")
        return self


class ValidationConfig(Section):
    """Held-out evaluation during training, on `data.val_files`."""

    every_steps: Annotated[int, Field(ge=0, le=1_000_000_000)] = Field(
        10, description="Evaluate every N steps (and at the end); 0: only at the end."
    )
    samples_per_prompt: Annotated[int, Field(ge=1, le=1024)] = Field(
        1, description="Samples per problem (avg@k and pass@k use k of them)."
    )
    temperature: NonNegativeFloat = Field(0.6, description="Sampling temperature of validation generations.")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="Nucleus sampling threshold.")
    max_tokens: Tokens | None = Field(None, description="Longest validation answer; null: maxResponseLength.")


class TrainConfig(Section):
    """A whole training run: `luffy train CONFIG` reads one of these."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: NonBlank = Field("outputs", description="Where the final model and run artefacts are written.")

    @property
    def norm_length(self) -> int:
        """The constant divisor of `token-sum` aggregation."""
        return self.algorithm.norm_length or self.data.max_response_length

    @property
    def rollout_max_tokens(self) -> int:
        return self.rollout.max_tokens or self.data.max_response_length

    @property
    def importance_level(self) -> str:
        """The importance correction in force (`auto` resolved against rollout.maxStaleness): none, token, sequence."""
        level = self.algorithm.importance_correction
        if level == "auto":
            return "token" if self.rollout.max_staleness > 0 else "none"
        return level

    @property
    def group_size(self) -> int:
        """Samples per prompt that enter the advantage group."""
        a = self.algorithm
        return a.n_on_policy + (a.n_off_policy if a.uses_traces_in_group else 0)


def format_validation_error(err: ValidationError, source: str | None = None, by_alias: bool = False) -> str:
    """One line per problem, each starting with the field's full dotted path (list indices included; camelCase
    field names of cross-field rules with `by_alias`, as a manifest spells them)."""
    where = f" in {source}" if source else ""
    lines = [f"invalid configuration{where}:"]
    for e in err.errors():
        loc = list(e["loc"])
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, RuleError):
            loc.append(to_camel(cause.field) if by_alias else cause.field)
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


AnyConfig = TypeVar("AnyConfig", bound=Section)


def parse_config(data: dict[str, Any], source: str | None = None, model: type[AnyConfig] = TrainConfig) -> AnyConfig:
    """Validate a config mapping as `model` (a training run unless told), raising ConfigError with full field paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration{' in ' + source if source else ''}: expected a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set dotted.key=value` override; the value is read as YAML (numbers, lists, null...)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a copy); validation happens afterwards, so bad keys name their path."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            k = _existing_spelling(node, k)
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[_existing_spelling(node, keys[-1])] = value
    return out


def _existing_spelling(node: dict[str, Any], key: str) -> str:
    """The key already used in `node` for the same field (`train_files` and `trainFiles` are one field)."""
    return next((k for k in node if to_snake(k) == to_snake(key)), key)


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, model: type[AnyConfig] = TrainConfig
) -> AnyConfig:
    """Load a YAML config file (none: the defaults), apply `dotted.key=value` overrides, validate as `model`."""
    if path is None:
        return parse_config(apply_overrides({}, overrides or []), source="--set overrides", model=model)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return parse_config(apply_overrides(data, overrides or []), source=str(path), model=model)


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (snake_case keys), as logged to MLflow and written to ConfigMaps."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten_config(config: TrainConfig) -> dict[str, str]:
    """Dotted-key view of the config, for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = "null" if node is None else str(node)

    walk("", config.model_dump(mode="json"))
    return flat
