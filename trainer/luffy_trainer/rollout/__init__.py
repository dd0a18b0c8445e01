"""Rollout engines: the engine protocol and its backends (vLLM in-process, vLLM servers, HF transformers).

`build_rollout_engine(config, model_path)` picks one by `rollout.backend`. Backends import torch/vLLM only when built.
"""

from luffy_trainer.rollout.base import Completion, RolloutEngine, RolloutError, SamplingParams
from luffy_trainer.rollout.factory import build_rollout_engine

__all__ = ["Completion", "RolloutEngine", "RolloutError", "SamplingParams", "build_rollout_engine"]
