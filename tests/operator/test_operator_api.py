"""The LuffyRun API models: they embed the trainer's config, and the operator package stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import pytest
from luffy_operator.api import (
    LuffyRunSpec,
    RolloutSampling,
    SpecError,
    dump_spec,
    immutable_changes,
    parse_spec,
    with_mutable_fields,
)
from luffy_operator.fields import quantity_value
from luffy_operator.settings import OperatorSettings
from luffy_trainer.config import (
    AlgorithmConfig,
    DataConfig,
    ModelConfig,
    OptimizationConfig,
    RewardConfig,
    RolloutConfig,
    TrackingConfig,
    TrainConfig,
    ValidationConfig,
)
from luffyrun_samples import valid_run
from pydantic import ValidationError


def test_operator_and_status_reporter_import_without_torch() -> None:
    code = (
        "import sys; import luffy_operator.handlers, luffy_operator.cli, luffy_operator.crd; "
        "import luffy_trainer.k8s_status; "
        "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_spec_embeds_the_trainer_config_models() -> None:
    fields = LuffyRunSpec.model_fields
    embedded = {
        "model": ModelConfig,
        "data": DataConfig,
        "algorithm": AlgorithmConfig,
        "reward": RewardConfig,
        "optimization": OptimizationConfig,
        "validation": ValidationConfig,
    }
    for name, model in embedded.items():
        assert fields[name].annotation is model, name
    assert issubclass(fields["mlflow"].annotation.__args__[0], TrackingConfig)


def test_every_trainer_config_section_is_mapped_by_the_operator() -> None:
    """A new TrainConfig section must be embedded in the spec or set by manifests.train_config."""
    mapped = {"model", "data", "algorithm", "reward", "optimization", "validation"}
    derived = {"rollout", "checkpoint", "tracking", "output_dir"}
    assert set(TrainConfig.model_fields) == mapped | derived


def test_rollout_sampling_reuses_the_trainer_fields_and_their_limits() -> None:
    set_by_the_operator = {"backend", "server_urls", "control_token_file", "weight_sync_host", "weight_sync_port"}
    assert set(RolloutSampling.model_fields) == set(RolloutConfig.model_fields) - set_by_the_operator
    for bad in ({"topP": 1.5}, {"gpuMemoryUtilization": 0}, {"topK": -2}):
        with pytest.raises(ValidationError):
            RolloutConfig.model_validate(bad)
        with pytest.raises(ValidationError):
            RolloutSampling.model_validate(bad)


def test_a_manifest_is_camel_case_only_and_strictly_typed() -> None:
    """The API server prunes a snake_case key and refuses "8" for 8; the operator does the same, while the trainer's
    own YAML configs keep accepting both spellings and YAML's lax types."""
    camel = valid_run()["spec"]
    snake = {**camel, "failure_policy": camel["failurePolicy"]}
    del snake["failurePolicy"]
    with pytest.raises(SpecError, match=r"spec\.failure_policy: unknown field"):
        parse_spec(snake)
    with pytest.raises(SpecError, match=r"spec\.rollout\.replicas"):
        parse_spec({**camel, "rollout": {"replicas": "2", "gpusPerReplica": 0}})
    with pytest.raises(SpecError, match="finite"):
        parse_spec({**camel, "optimization": {"lr": float("inf")}})
    assert RolloutConfig.model_validate({"tensor_parallel_size": 2}).tensor_parallel_size == 2
    assert RolloutConfig.model_validate({"tensorParallelSize": "2"}).tensor_parallel_size == 2


def test_spec_errors_list_every_problem_by_path() -> None:
    spec = valid_run()["spec"]
    spec["rollout"] = {"replicas": 0, "topP": 2}
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert "spec.rollout.replicas" in str(err.value) and "spec.rollout.topP" in str(err.value)
    with pytest.raises(SpecError, match="spec: must be a mapping"):
        parse_spec(["not", "a", "mapping"])


def test_immutable_changes_ignore_the_mutable_fields() -> None:
    old = dump_spec(parse_spec(valid_run()["spec"]))
    new = dump_spec(parse_spec(valid_run(suspend=True, failurePolicy={"maxRestarts": 9})["spec"]))
    new["rollout"]["replicas"] = 5
    assert immutable_changes(old, new) == []
    new["model"]["path"] = "/elsewhere"
    new["rollout"]["temperature"] = 0.5
    assert immutable_changes(old, new) == ["spec.model.path", "spec.rollout.temperature"]
    merged = with_mutable_fields(old, new)
    assert merged["model"]["path"] == old["model"]["path"] and merged["rollout"]["temperature"] == 1.0
    assert (merged["suspend"], merged["rollout"]["replicas"], merged["failurePolicy"]["maxRestarts"]) == (True, 5, 9)
    assert old["rollout"]["replicas"] == 2  # the accepted spec itself is not modified


def test_operator_settings_from_the_environment() -> None:
    settings = OperatorSettings.from_env({"LUFFY_OPERATOR_RESYNC_SECONDS": "2.5", "LUFFY_OPERATOR_WORKERS": "4"})
    assert (settings.resync_seconds, settings.workers) == (2.5, 4)
    assert OperatorSettings.from_env({}) == OperatorSettings()
    with pytest.raises(ValueError, match="LUFFY_OPERATOR_WORKERS='many'"):
        OperatorSettings.from_env({"LUFFY_OPERATOR_WORKERS": "many"})
    with pytest.raises(ValueError, match="LUFFY_OPERATOR_RESYNC_SECONDS must be positive"):
        OperatorSettings.from_env({"LUFFY_OPERATOR_RESYNC_SECONDS": "0"})


def test_quantities_compare_by_their_amount() -> None:
    assert quantity_value("1Gi") == 2**30 and quantity_value("1500m") == Decimal("1.5")
    assert quantity_value("1e3") == 1000 and quantity_value(2) == 2 and quantity_value("2E") == 2 * 10**18
    for bad in ("-1", "1 Gi", "lots", ""):
        with pytest.raises(ValueError):
            quantity_value(bad)
