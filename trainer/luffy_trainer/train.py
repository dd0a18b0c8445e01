"""`luffy train`: the LUFFY training loop, from a config to a trained model tracked in MLflow.

One step (one rollout batch):
  prompts -> on-policy rollouts (vLLM) -> rewards -> groups with off-policy traces -> advantages
  -> optimizer step(s) -> weight sync to the rollout engines -> metrics -> checkpoint.
Baselines (`grpo`, `sft`, `rl_sft_loss`) are the same loop with other group construction and loss terms (groups.py).
With `rollout.maxStaleness` = k > 0 the rollouts of batch s+1.. are generated while batch s trains, from the weights
after step s-1-k (pipeline.py); k = 0 is the strict alternation.

Under torchrun every rank trains its share of each batch (policy.py); rank 0 alone draws prompts, drives the rollout
engines, grades, logs to MLflow and reports progress.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from luffy_trainer import contract, preemption
from luffy_trainer.checkpoint import CheckpointManager, restore_rng_state, rng_state
from luffy_trainer.config import ConfigError, TrainConfig, dump_config, flatten_config, load_config
from luffy_trainer.distributed import (
    World,
    broadcast_object,
    device_of,
    full_parameters,
    init_distributed,
)
from luffy_trainer.evaluation import EvalResult, evaluate
from luffy_trainer.groups import GroupInput, Sample, build_samples
from luffy_trainer.pipeline import RolloutBatch, RolloutPipeline, staleness_metrics
from luffy_trainer.policy import PolicyUpdater, build_optimizer, build_policy
from luffy_trainer.progress import Progress
from luffy_trainer.rollout.base import RolloutEngine, SamplingParams

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "loss": "loss/total",
    "pg_loss": "loss/policy",
    "on_policy_loss": "loss/on_policy",
    "off_policy_loss": "loss/off_policy",
    "nll_loss": "loss/nll",
    "entropy": "actor/entropy",
    "off_policy_prob_mean": "actor/off_policy_prob_mean",
    "off_policy_shaped_mean": "actor/off_policy_shaped_mean",
    "on_policy_ratio_mean": "actor/on_policy_ratio_mean",
    "clip_fraction": "actor/clip_fraction",
    "importance_weight_mean": "is/weight_mean",
    "importance_capped_fraction": "is/capped_fraction",
    "kl_behaviour_old": "is/kl_behaviour_old",
    "grad_norm": "actor/grad_norm",
    "lr": "actor/lr",
}


@dataclass
class TrainResult:
    """What a finished training produced."""

    final_step: int
    model_dir: Path
    run_id: str | None
    model_version: str | None = None
    best_model_version: str | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    validation: EvalResult | None = None
    validation_history: dict[int, EvalResult] = field(default_factory=dict)  # step -> held-out result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def solved(reward: float) -> bool:
    """Rewards are 0/1 for the math reward; above one half counts as solved in the rate metrics."""
    return reward > 0.5


def batch_metrics(samples: list[Sample], trace_rewards: list[float]) -> dict[str, float]:
    """Reward, solve-rate and length metrics of one rollout batch."""
    m: dict[str, float] = {}
    on = [s for s in samples if not s.off_policy]
    off = [s for s in samples if s.off_policy]
    in_group = [s.reward for s in samples if s.policy_gradient] or [s.reward for s in samples]
    m["reward/mean"] = float(np.mean(in_group))
    if on:
        m["reward/on_policy"] = float(np.mean([s.reward for s in on]))
        per_prompt = defaultdict(list)
        for s in on:
            per_prompt[s.group].append(solved(s.reward))
        m["batch/solve_all"] = float(np.mean([all(v) for v in per_prompt.values()]))
        m["batch/solve_none"] = float(np.mean([not any(v) for v in per_prompt.values()]))
        m["response_length/on_policy_mean"] = float(np.mean([len(s.response_ids) for s in on]))
        m["response_length/truncated_fraction"] = float(np.mean([s.truncated for s in on]))
    if off:
        m["reward/off_policy"] = float(np.mean(trace_rewards))
        m["response_length/off_policy_mean"] = float(np.mean([len(s.response_ids) for s in off]))
    return m


def _single_rank_group_for_gpu() -> None:
    """A one-process run on a GPU still uses FSDP2 (for its mixed precision), which needs a process group."""
    if "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")


class LuffyTrainer:
    """Owns the policy, its optimizer, the rollout engine, rewards, tracking and checkpoints of one run."""

    def __init__(self, config: TrainConfig, *, workdir: str | Path = ".", world: World | None = None) -> None:
        self.config = config
        self.algorithm = config.algorithm
        self.workdir = Path(workdir)
        if world is None:
            _single_rank_group_for_gpu()
            world = init_distributed()
        self.world = world
        self.device = device_of(world)
        self.engine: RolloutEngine | None = None
        self.tracker = None
        self.reward_pool = None
        self.status_reporter = None
        self.rollouts: RolloutPipeline | None = None
        self.stop = preemption.StopRequest()  # SIGTERM: checkpoint and stop at the next step boundary
        # Modes without rollouts have nothing to generate ahead.
        self.max_staleness = config.rollout.max_staleness if self.algorithm.uses_rollouts else 0
        self.resumed_batches: list[RolloutBatch] = []  # generated ahead before the checkpoint resumed from
        self.run_id: str | None = None
        self.synced_version = 0  # the weight version every rollout engine serves
        self.best: dict[str, float] | None = None  # {"step", "score"} of the best validation so far

    # --- setup ----------------------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        from luffy_trainer.data import ResumableSampler, load_examples

        cfg = self.config
        loaded = load_examples(
            cfg.data.train_files, cfg.data, self.tokenizer, require_traces=self.algorithm.uses_traces
        )
        self.examples = loaded.examples
        if len(self.examples) < cfg.optimization.prompts_per_step:
            raise ConfigError(
                f"data.train_files: {len(self.examples)} usable examples, fewer than "
                f"optimization.prompts_per_step = {cfg.optimization.prompts_per_step}"
            )
        self.sampler = ResumableSampler(len(self.examples), seed=cfg.optimization.seed, shuffle=cfg.data.shuffle)
        self.val_examples = []
        if cfg.data.val_files:
            self.val_examples = load_examples(
                cfg.data.val_files, cfg.data, self.tokenizer, require_traces=False
            ).examples

    def _resume(self) -> dict[str, Any] | None:
        mode = self.config.checkpoint.resume
        latest = self.checkpoints.latest() if mode != "never" else None
        if latest is None:
            if mode == "required":
                raise ConfigError(f"checkpoint.resume=required but {self.checkpoints.directory} has no checkpoint")
            return None
        state = self.checkpoints.load(latest, self.policy, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.world.is_main:
            self.sampler.load_state_dict(state["sampler"])
            ahead = state.get("rollout_queue", [])
            if len(ahead) > self.max_staleness:
                raise ConfigError(
                    f"rollout.maxStaleness: the checkpoint at step {state['step']} was saved with {len(ahead)} "
                    f"batch(es) generated ahead; resume with maxStaleness {len(ahead)} or more"
                )
            self.resumed_batches = ahead
        restore_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", latest, state["step"])
        return state

    def setup(self) -> None:
        cfg = self.config
        seed_everything(cfg.optimization.seed)
        self.tokenizer, self.policy = build_policy(cfg, self.world, self.device)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg)
        if self.world.is_main:
            self._load_data()
        self.updater = PolicyUpdater(
            self.policy, self.optimizer, self.scheduler, cfg, self.tokenizer.pad_token_id, self.world, self.device
        )
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
        resumed = self._resume()
        self.start_step = resumed["step"] + 1 if resumed else 1
        self.best = resumed.get("best") if resumed else None
        self.has_validation = bool(broadcast_object(bool(self.world.is_main and self.val_examples), self.world))
        if self.world.is_main:
            self._setup_rank0(resumed)
        if resumed and (self.algorithm.uses_rollouts or self.has_validation):
            # The engines loaded the weights of the model directory; they must serve the restored ones first.
            self._sync_weights(version=resumed["step"])

    def _setup_rank0(self, resumed: dict[str, Any] | None) -> None:
        from luffy_trainer.k8s_status import ProgressReporter
        from luffy_trainer.rewards import RewardPool
        from luffy_trainer.rollout import build_rollout_engine
        from luffy_trainer.tracking import MlflowTracker

        cfg = self.config
        self.tracker = MlflowTracker(cfg.tracking, workdir=self.workdir)
        self.run_id = self.tracker.start(flatten_config(cfg), resume_run_id=resumed.get("run_id") if resumed else None)
        if not resumed:
            self.tracker.log_text(dump_config(cfg), "config/resolved.yaml")
            self.tracker.log_code_version("luffy train")
        self.tracker.log_datasets({"training": cfg.data.train_files, "validation": cfg.data.val_files})
        self.status_reporter = ProgressReporter.from_env()
        self.reward_pool = RewardPool(cfg.reward.name, cfg.reward.num_workers, cfg.reward.timeout_s)
        if self.algorithm.uses_rollouts or self.val_examples:
            self.engine = build_rollout_engine(cfg, cfg.model.path)
        self.rollouts = RolloutPipeline(self._produce)
        self.rollouts.load_state_dict(self.resumed_batches)

    # --- one step --------------------------------------------------------------------------------------------------

    def _rollout_params(self) -> SamplingParams:
        r = self.config.rollout
        return SamplingParams(self.config.rollout_max_tokens, r.temperature, r.top_p, r.top_k)

    def _score(self, examples, completions) -> tuple[list[list[float]], list[float]]:
        """Grade every rollout (and every trace, when the mode uses traces) with the configured reward."""
        texts, truths = [], []
        for ex, outs in zip(examples, completions, strict=True):
            for c in outs:
                texts.append(self.tokenizer.decode(c.token_ids, skip_special_tokens=False))
                truths.append(ex.ground_truth)
        if self.algorithm.uses_traces:
            for ex in examples:
                texts.append(self.tokenizer.decode(ex.trace_ids, skip_special_tokens=False))
                truths.append(ex.ground_truth)
        scores = self.reward_pool.score(texts, truths) if texts else []
        rollout_rewards, pos = [], 0
        for outs in completions:
            rollout_rewards.append(scores[pos : pos + len(outs)])
            pos += len(outs)
        return rollout_rewards, scores[pos:] if self.algorithm.uses_traces else [0.0] * len(examples)

    def _schedule(self, next_step: int) -> None:
        """Rank 0: submit every batch due once the weights of step next_step-1 are pushed: next_step..next_step+k."""
        last = min(next_step + self.max_staleness, self.config.optimization.total_steps)
        for step in range(next_step, last + 1):
            if step not in self.rollouts:
                drawn = self.sampler.next_batch(self.config.optimization.prompts_per_step)
                self.rollouts.submit(step, [self.examples[i] for i in drawn], self.sampler.epoch)

    def _produce(self, step: int, examples, epoch: int) -> RolloutBatch:
        """Rank 0, on the pipeline's thread: generate, grade, build the groups of one batch."""
        completions, t_gen = [[] for _ in examples], 0.0
        if self.algorithm.uses_rollouts:
            t0 = time.perf_counter()
            seed = self.config.optimization.seed * 100_003 + step
            completions = self.engine.generate(
                [ex.prompt_ids for ex in examples], self.algorithm.n_on_policy, self._rollout_params(), seed=seed
            )
            t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        rollout_rewards, trace_rewards = self._score(examples, completions)
        t_reward = time.perf_counter() - t0
        groups = [
            GroupInput(
                prompt_ids=ex.prompt_ids,
                rollouts=[c.token_ids for c in outs],
                rollout_rewards=rr,
                rollout_truncated=[c.finish_reason == "length" for c in outs],
                trace_ids=ex.trace_ids,
                trace_reward=tr,
                rollout_logprobs=[c.logprobs for c in outs],
                rollout_versions=[c.weight_version for c in outs],
            )
            for ex, outs, rr, tr in zip(examples, completions, rollout_rewards, trace_rewards, strict=True)
        ]
        samples = build_samples(groups, self.algorithm)
        generated = sum(len(c.token_ids) for outs in completions for c in outs)
        metrics = batch_metrics(samples, trace_rewards)
        metrics.update(
            {
                "time/generate_s": t_gen,
                "time/reward_s": t_reward,
                "throughput/rollout_tokens_per_s": generated / t_gen if t_gen else 0.0,
                "progress/epoch": float(epoch),
            }
        )
        return RolloutBatch(step, samples, metrics)

    def _collect(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Rank 0: batch `step` from the pipeline, with its staleness and how long training waited for it."""
        batch, waited = self.rollouts.take(step)
        metrics = {**batch.metrics, **staleness_metrics(batch, self.max_staleness), "time/wait_rollout_s": waited}
        return batch.samples, metrics

    def _sync_weights(self, version: int) -> float:
        """Push the current weights to every rollout engine (collective: all ranks gather, rank 0 sends)."""
        start = time.perf_counter()
        weights = full_parameters(self.policy, prefix="lm.")
        if self.world.is_main:
            self.engine.update_weights(weights, version)
        else:
            for _ in weights:
                pass
        self.synced_version = version
        return time.perf_counter() - start

    def step(self, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        samples, metrics = self._collect(step) if self.world.is_main else (None, {})
        samples = broadcast_object(samples, self.world)
        t0 = time.perf_counter()
        train_stats = self.updater.optimize(samples)
        t_train = time.perf_counter() - t0
        t_sync = 0.0
        if self.algorithm.uses_rollouts:
            if self.world.is_main:
                self.rollouts.drain()  # the batches generated meanwhile are done: the weights may change
            t_sync = self._sync_weights(version=step)
        trained = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        metrics.update({METRIC_NAMES[k]: v for k, v in train_stats.items() if k in METRIC_NAMES})
        metrics.update(
            {
                "time/train_s": t_train,
                "time/weight_sync_s": t_sync,
                "throughput/train_tokens_per_s": trained / t_train if t_train else 0.0,
                "time/step_s": time.perf_counter() - t_step,
            }
        )
        return metrics

    # --- validation, checkpoints, the run ---------------------------------------------------------------------------

    def validate(self, step: int) -> EvalResult | None:
        """Held-out evaluation on rank 0 (after a collective weight sync if the engines are behind)."""
        if not self.has_validation:
            return None
        if self.synced_version != step:
            self._sync_weights(version=step)
        if not self.world.is_main:
            return None
        v = self.config.validation
        params = SamplingParams(v.max_tokens or self.config.data.max_response_length, v.temperature, v.top_p)
        result = evaluate(
            self.engine,
            self.val_examples,
            self.tokenizer,
            self.reward_pool,
            params,
            v.samples_per_prompt,
            seed=self.config.optimization.seed,
        )
        log.info("validation at step %d: %s", step, ", ".join(f"{k}={x:.3f}" for k, x in result.metrics().items()))
        return result

    def save_checkpoint(self, step: int) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "rng": rng_state(), "run_id": self.run_id, "best": self.best}
        if self.world.is_main:
            # The sampler has drawn the prompts of the batches generated ahead; they are saved with it.
            state["sampler"] = self.sampler.state_dict()
            state["rollout_queue"] = self.rollouts.state_dict()
        self.checkpoints.save(step, self.policy, self.optimizer, state)

    def track_best(self, step: int, val: EvalResult | None) -> dict[str, float]:
        """Keep the model of the best mean validation avg@k in `outputDir/best` (collective: every rank calls it)."""
        score = val.mean[f"avg@{val.k}"] if val is not None else None
        improved = score is not None and (self.best is None or score > self.best["score"])
        new_best = broadcast_object({"step": step, "score": score} if improved else None, self.world)
        if new_best is not None:
            self.best = new_best
            self.save_model("best")
            if self.world.is_main:
                log.info("new best validation score %.4f at step %d", self.best["score"], step)
        return {"val/best/mean_avg": self.best["score"], "val/best/step": self.best["step"]} if self.best else {}

    def save_model(self, name: str) -> Path:
        """Gather the full weights and save an HF model directory `outputDir/<name>` (rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = Path(self.config.output_dir) / name
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            path.mkdir(parents=True, exist_ok=True)
            state = {k.removeprefix("lm."): v for k, v in full.items()}
            self.policy.lm.save_pretrained(path, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        return path

    def _log_models(self, result: TrainResult) -> None:
        """The final model (alias `registeredModelAlias`) and, when asked, the best one (alias `bestModelAlias`)."""
        tracking = self.config.tracking
        if not tracking.log_model:
            return
        result.model_version = self.tracker.log_model(result.model_dir, alias=tracking.registered_model_alias)
        if self.best and tracking.best_model_alias and tracking.registered_model_name:
            self.tracker.set_tags({"luffy.best_step": str(int(self.best["step"]))})
            result.best_model_version = self.tracker.log_model(
                Path(self.config.output_dir) / "best",
                artifact_name=contract.BEST_MODEL_ARTIFACT,
                alias=tracking.best_model_alias,
            )

    def _record(self, step: int, metrics: dict[str, float], progress: Progress) -> None:
        cfg = self.config
        if step % cfg.tracking.log_every_steps == 0 or step == cfg.optimization.total_steps:
            self.tracker.log_metrics(step, metrics)
        if self.status_reporter is not None:
            self.status_reporter.report(step, cfg.optimization.total_steps, metrics.get("reward/mean"))
        tokens_per_s = metrics.get("throughput/rollout_tokens_per_s") or metrics.get("throughput/train_tokens_per_s")
        progress.update(step, metrics.get("reward/mean"), tokens_per_s)

    def _train_steps(self, result: TrainResult, progress: Progress | None) -> None:
        """Steps start_step..total_steps, with validation, best-model tracking and checkpoints along the way."""
        cfg = self.config
        total = cfg.optimization.total_steps
        if self.start_step > total:
            log.info("the checkpoint is already at step %d of %d: no training left", self.start_step - 1, total)
        if self.world.is_main:
            self._schedule(self.start_step)
        for step in range(self.start_step, total + 1):
            metrics = self.step(step)
            every = cfg.validation.every_steps
            if step == total or (every and step % every == 0):
                val = self.validate(step)
                if val is not None:
                    metrics.update(val.metrics())
                    result.validation = result.validation_history[step] = val
                if self.has_validation:
                    metrics.update(self.track_best(step, val))
            if self.world.is_main:
                self._record(step, metrics, progress)
            saved = step % cfg.checkpoint.every_steps == 0 or step == total
            if saved:
                self.save_checkpoint(step)
            if step < total and self.stop.agreed(self.world, self.device):
                preemption.stop_at(step, saved, self.save_checkpoint)
            if self.world.is_main:
                self._schedule(step + 1)
            result.final_step, result.last_metrics = step, metrics

    def run(self) -> TrainResult:
        status = "FAILED"
        self.stop.watch()
        try:
            self.setup()
            cfg = self.config
            result = TrainResult(self.start_step - 1, Path(cfg.output_dir) / "final", self.run_id)
            progress = Progress(self.start_step, cfg.optimization.total_steps) if self.world.is_main else None
            try:
                self._train_steps(result, progress)
            finally:  # once, and before the final save: its log lines must not run into the bar
                if progress is not None:
                    progress.close()
            result.model_dir = self.save_model("final")
            if self.world.is_main:
                log.info("final model saved to %s", result.model_dir)
                self._log_models(result)
            status = "FINISHED"
            return result
        except (KeyboardInterrupt, preemption.Preempted):
            status = "KILLED"
            raise
        except Exception as exc:
            if self.world.distributed:
                log.error("rank %d of %d failed: %s", self.world.rank, self.world.world_size, exc)
            raise
        finally:
            self.stop.restore()
            self.close(status)

    def close(self, status: str) -> None:
        if self.rollouts is not None:
            self.rollouts.close()
        if self.engine is not None:
            self.engine.close()
        if self.reward_pool is not None:
            self.reward_pool.close()
        if self.tracker is not None and self.tracker.run_id is not None:
            self.tracker.finish(status, spill_dir=self.workdir)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.resume:
        config.checkpoint.resume = "required"
    try:
        result = LuffyTrainer(config).run()
    except preemption.Preempted as stopped:
        print(f"luffy train: {stopped}", file=sys.stderr)
        return contract.PREEMPTED_EXIT_CODE
    if result.run_id is not None:
        print(f"trained to step {result.final_step}; model: {result.model_dir}; MLflow run: {result.run_id}")
    return 0
