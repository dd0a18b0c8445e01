"""The run configuration: released-run defaults, field-path errors, camelCase aliases, overrides."""

from __future__ import annotations

import pytest
import yaml
from luffy_trainer.config import (
    AlgorithmConfig,
    ConfigError,
    TrainConfig,
    apply_overrides,
    dump_config,
    flatten_config,
    load_config,
    parse_config,
)


def test_defaults_reproduce_the_released_luffy_main_run():
    """Values from §2.2 of the algorithm notes (exp_scripts/train.sh of the released code)."""
    c = TrainConfig()
    assert c.algorithm.mode == "luffy"
    assert (c.algorithm.n_on_policy, c.algorithm.n_off_policy) == (7, 1)
    assert c.group_size == 8
    assert c.algorithm.gamma == 0.1
    assert c.algorithm.clip_eps is None  # loss_remove_clip=True
    assert c.algorithm.normalize_std is False  # grpo_use_std=False
    assert c.algorithm.aggregation == "token-sum"
    assert c.algorithm.loss_scale == "invariant"  # layout-free; `released` is the paper's exact scaling
    assert c.norm_length == 8192  # token-sum / max_response_length
    assert c.algorithm.entropy_coeff == 0.001
    assert c.data.max_prompt_length == 1024 and c.data.max_response_length == 8192
    assert c.data.overlong_prompt == "error"
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    o = c.optimization
    assert (o.lr, o.weight_decay, o.grad_clip, o.betas, o.warmup_steps) == (1e-6, 0.01, 1.0, (0.9, 0.999), 0)
    assert (o.prompts_per_step, o.optimizer_steps_per_batch, o.seed) == (128, 2, 47)
    assert c.checkpoint.every_steps == 50 and c.checkpoint.keep_last == 2 and c.checkpoint.resume == "auto"
    assert c.model.trust_remote_code is False


def _error(data) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, source="run.yaml")
    return str(exc.value)


def test_unknown_nested_field_names_its_full_path():
    msg = _error({"algorithm": {"gama": 0.2}})
    assert "run.yaml" in msg
    assert "algorithm.gama: unknown field" in msg


def test_ill_typed_field_names_its_full_path():
    assert "optimization.lr" in _error({"optimization": {"lr": "fast"}})
    assert "data.luffy_columns.prompt" in _error({"data": {"luffy_columns": {"prompt": 3}}})


def test_list_items_are_named_by_index():
    assert "data.train_files.1" in _error({"data": {"train_files": ["a.parquet", {"x": 1}]}})


def test_bounds_and_enums():
    assert "algorithm.gamma" in _error({"algorithm": {"gamma": -1}})
    assert "algorithm.mode" in _error({"algorithm": {"mode": "ppo"}})
    assert "rollout.top_p" in _error({"rollout": {"top_p": 1.5}})
    assert "optimization.total_steps" in _error({"optimization": {"total_steps": 0}})


def test_cross_field_rules():
    assert "algorithm.n_off_policy: Value error, must be at least 1" in _error({"algorithm": {"n_off_policy": 0}})
    assert "divisible" in _error({"optimization": {"prompts_per_step": 5, "optimizer_steps_per_batch": 2}})
    clips = {"off_policy_min_clip": 0.9, "off_policy_max_clip": 0.5}
    assert "algorithm.off_policy_min_clip: Value error, must not exceed" in _error({"algorithm": clips})
    msg = _error({"algorithm": {"lossScale": "released", "aggregation": "token-mean"}})
    assert "algorithm.loss_scale: Value error, 'released' scales the token-sum aggregation" in msg
    warmup = {"warmup_steps": 11, "total_steps": 10}
    assert "optimization.warmup_steps: Value error, 11 must not exceed" in _error({"optimization": warmup})
    assert "tracking.best_model_alias" in _error({"tracking": {"best_model_alias": "best"}})
    assert "algorithm.loss_scale" in _error({"algorithm": {"loss_scale": "paper"}})
    # grpo does not use traces, so zero off-policy samples is fine there
    assert parse_config({"algorithm": {"mode": "grpo", "n_off_policy": 0}}).group_size == 7


def test_group_size_by_mode():
    assert parse_config({"algorithm": {"mode": "grpo", "n_on_policy": 8}}).group_size == 8
    assert parse_config({"algorithm": {"mode": "rl_sft_loss"}}).group_size == 7  # trace not in the group
    assert parse_config({"algorithm": {"mode": "sft", "n_on_policy": 0}}).algorithm.uses_rollouts is False


@pytest.mark.parametrize(
    ("mode", "meaning"),
    [
        ("luffy", (True, True, True, False, 0.0, True)),
        ("grpo", (True, False, False, False, 0.0, True)),
        ("sft", (False, True, False, True, 1.0, False)),
        ("rl_sft_loss", (True, True, False, True, 0.5, True)),
    ],
)
def test_what_each_mode_means(mode, meaning):
    """The table of groups.py: rollouts, traces, traces in the group, NLL term and its weight, entropy bonus."""
    a = AlgorithmConfig(mode=mode, n_on_policy=0 if mode == "sft" else 7, sft_loss_coef=0.5)
    got = (a.uses_rollouts, a.uses_traces, a.uses_traces_in_group, a.uses_nll, a.nll_coef, a.uses_entropy_bonus)
    assert got == meaning


def test_camel_case_aliases_are_accepted():
    c = parse_config(
        {"algorithm": {"nOnPolicy": 3, "clipEps": 0.2}, "data": {"maxResponseLength": 64, "trainFiles": ["x.jsonl"]}}
    )
    assert c.algorithm.n_on_policy == 3 and c.algorithm.clip_eps == 0.2
    assert c.data.max_response_length == 64 and c.data.train_files == ["x.jsonl"]
    assert c.norm_length == 64


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"gamma": 0.3}, "optimization": {"total_steps": 10}}))
    c = load_config(path, ["algorithm.mode=grpo", "optimization.lr=2e-5", "algorithm.gamma=null"])
    assert c.algorithm.mode == "grpo" and c.optimization.lr == 2e-5 and c.algorithm.gamma is None
    assert c.optimization.total_steps == 10
    with pytest.raises(ConfigError, match=r"tracking\.x: unknown field"):
        load_config(path, ["tracking.x.y=1"])


def test_snake_case_override_replaces_camel_case_key():
    data = apply_overrides({"data": {"trainFiles": ["a"]}, "outputDir": "x"}, ["data.train_files=[b]", "output_dir=y"])
    assert data == {"data": {"trainFiles": ["b"]}, "outputDir": "y"}
    assert parse_config(data).data.train_files == ["b"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        apply_overrides({}, ["algorithm.gamma"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"algorithm": {"gamma": 0.1}}, ["algorithm.gamma.x=1"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_dump_round_trips_and_flattens():
    c = parse_config({"algorithm": {"gamma": 0.5}, "data": {"train_files": ["a", "b"]}})
    assert parse_config(yaml.safe_load(dump_config(c))) == c
    flat = flatten_config(c)
    assert flat["algorithm.gamma"] == "0.5"
    assert flat["algorithm.clip_eps"] == "null"
    assert flat["data.train_files"] == "['a', 'b']"


@pytest.mark.parametrize("level", ["auto", "none", "token", "sequence"])
def test_importance_correction_levels_survive_yaml(level):
    """Written unquoted in YAML, as users write them (an `off` would be read as a boolean)."""
    config = TrainConfig.model_validate(yaml.safe_load(f"algorithm:\n  importanceCorrection: {level}\n"))
    assert config.algorithm.importance_correction == level
