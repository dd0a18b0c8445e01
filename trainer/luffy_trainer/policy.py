"""The policy being trained and its update: mini-batches, micro-batches, ranks, one optimizer step per mini-batch.

By default the objective of a mini-batch is the same whatever the number of ranks and micro-batches: every term is
normalised by mini-batch totals summed over ranks (loss.py); `algorithm.lossScale: released` scales the terms as the
released LUFFY code does instead. Each rank's share of the objective is multiplied by the world size because FSDP
averages gradients over ranks.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from torch import nn

from luffy_trainer.config import ModelConfig, TrainConfig, UserError, one_line
from luffy_trainer.distributed import World, all_reduce_max, all_reduce_sum, shard_model
from luffy_trainer.groups import Sample, TensorBatch, collate, split_microbatches, split_minibatches
from luffy_trainer.logprobs import token_logprobs
from luffy_trainer.loss import MiniBatchTotals, micro_batch_loss

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Metrics of policy_loss that are means over a token subset: combined across micro-batches and ranks weighted by it.
TOKEN_WEIGHTED = {
    "off_policy_prob_mean": "off_policy_tokens",
    "off_policy_shaped_mean": "off_policy_tokens",
    "on_policy_ratio_mean": "on_policy_tokens",
    "clip_fraction": "on_policy_tokens",
    "importance_weight_mean": "on_policy_tokens",
    "importance_capped_fraction": "on_policy_tokens",
    "kl_behaviour_old": "on_policy_tokens",
}


class PolicyModel(nn.Module):
    """A causal LM whose forward returns response-token log-probs and entropies (the FSDP root module)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: TensorBatch, *, temperature: float, with_entropy: bool):
        device = next(self.lm.parameters()).device
        return token_logprobs(
            self.lm,
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            batch.response_width,
            temperature=temperature,
            with_entropy=with_entropy,
        )

    @property
    def transformer_layers(self) -> list[nn.Module]:
        """The decoder layers, each an FSDP unit."""
        return list(self.lm.get_decoder().layers)


def load_tokenizer(cfg: ModelConfig):
    """The model directory's tokenizer; a directory it cannot be read from is the user's to fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path {cfg.path}: cannot load its tokenizer: {one_line(exc)}") from None


def build_policy(config: TrainConfig, world: World, device: torch.device):
    """Load tokenizer and model; shard with FSDP2 on several ranks or a GPU. Returns (tokenizer, PolicyModel)."""
    from transformers import AutoModelForCausalLM

    cfg = config.model
    tokenizer = load_tokenizer(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sharded = world.distributed or device.type == "cuda"
    # Sharded runs keep a float32 master copy and compute in the configured dtype (FSDP2 mixed precision).
    load_dtype = torch.float32 if sharded else TORCH_DTYPES[cfg.dtype]
    try:
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=load_dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path {cfg.path}: cannot load its weights: {one_line(exc)}") from None
    return tokenizer, prepare_policy(lm, cfg, world, device, sharded=sharded)


def prepare_policy(lm: nn.Module, cfg: ModelConfig, world: World, device: torch.device, *, sharded: bool):
    """A loaded causal LM made trainable: checkpointing as configured, on `device`, FSDP2-sharded if `sharded`.

    Apart from `build_policy` so that benchmarks/gpu.py can train models it builds in memory with random weights.
    """
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyModel(lm).to(device)
    if sharded:
        param_dtype = TORCH_DTYPES[cfg.dtype] if device.type == "cuda" else None
        shard_model(policy, policy.transformer_layers, world, param_dtype)
    policy.train()
    return policy


def build_optimizer(policy: nn.Module, config: TrainConfig):
    """AdamW with linear warmup to a constant learning rate (the released LUFFY schedule has no warmup)."""
    opt = config.optimization
    optimizer = torch.optim.AdamW(policy.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    warmup = opt.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


class MetricAccumulator:
    """Sums per-micro-batch metrics: loss parts add up, subset means are accumulated weighted by their token count."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        for key, value in values.items():
            weight = values.get(TOKEN_WEIGHTED[key], 0.0) if key in TOKEN_WEIGHTED else 1.0
            self.sums[key] += value * weight

    def result(self, world: World, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = dict(zip(keys, all_reduce_sum([self.sums[k] for k in keys], world, device), strict=True))
        out = {}
        for key, value in totals.items():
            if key not in TOKEN_WEIGHTED:
                out[key] = value
            elif totals.get(TOKEN_WEIGHTED[key]):
                out[key] = value / totals[TOKEN_WEIGHTED[key]]
        return out


class PolicyUpdater:
    """Runs the optimizer steps of one rollout batch on this rank's share of the samples."""

    def __init__(
        self,
        policy: PolicyModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: TrainConfig,
        pad_id: int,
        world: World,
        device: torch.device,
    ) -> None:
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.config, self.pad_id, self.world, self.device = config, pad_id, world, device
        self.temperature = config.rollout.temperature or 1.0

    def _rank_batches(self, mini: list[Sample]) -> list[TensorBatch]:
        """This rank's micro-batches of a mini-batch, padded with no-loss batches to the count of the busiest rank."""
        share = mini[self.world.rank :: self.world.world_size]
        if share:
            budget = self.config.optimization.micro_batch_tokens
            batches = [collate(m, self.pad_id) for m in split_microbatches(share, budget)]
        else:
            batches = [collate(mini[:1], self.pad_id).without_loss()]
        count = all_reduce_max(len(batches), self.world, self.device)
        return batches + [batches[-1].without_loss()] * (count - len(batches))

    def _totals(self, batches: list[TensorBatch]) -> MiniBatchTotals:
        local = MiniBatchTotals.of(batches)
        summed = all_reduce_sum(
            [local.pg_tokens, local.pg_sequences, local.nll_tokens, local.response_tokens], self.world, self.device
        )
        return MiniBatchTotals(*(int(x) for x in summed))

    def _forward(self, batch: TensorBatch, *, grad: bool):
        with torch.set_grad_enabled(grad):
            return self.policy(batch, temperature=self.temperature, with_entropy=grad)

    def backward(
        self, batch: TensorBatch, batch_old: torch.Tensor | None, totals: MiniBatchTotals
    ) -> dict[str, torch.Tensor]:
        """Accumulate one micro-batch's gradient of the mini-batch objective; returns its metrics (`loss` among them).

        A method of its own so that benchmarks/gpu.py can compare one micro-batch's loss and gradients across devices.
        """
        logp, entropy = self._forward(batch, grad=True)
        loss, metrics = micro_batch_loss(
            batch,
            logp,
            logp.detach() if batch_old is None else batch_old,
            entropy,
            self.config.algorithm,
            self.config.norm_length,
            totals,
            self.world.world_size,
            importance_level=self.config.importance_level,
        )
        (loss * self.world.world_size).backward()
        return metrics

    def optimize(self, samples: list[Sample]) -> dict[str, float]:
        """One optimizer step per mini-batch; returns metrics averaged over the steps (the same on every rank)."""
        opt = self.config.optimization
        minis = [self._rank_batches(mini) for mini in split_minibatches(samples, opt.optimizer_steps_per_batch)]
        # With one optimizer step per batch the sampling policy is the current one: ratio 1, nothing to recompute.
        old: list[list[torch.Tensor | None]] = [[None] * len(m) for m in minis]
        if len(minis) > 1:
            self.policy.eval()
            old = [[self._forward(b, grad=False)[0].detach() for b in mini] for mini in minis]
            self.policy.train()
        per_step = []
        for batches, batches_old in zip(minis, old, strict=True):
            totals = self._totals(batches)
            acc = MetricAccumulator()
            for batch, batch_old in zip(batches, batches_old, strict=True):
                acc.add(self.backward(batch, batch_old, totals))
            stats = acc.result(self.world, self.device)
            stats["grad_norm"] = self._clip_gradients()
            stats["lr"] = self.scheduler.get_last_lr()[0]
            if math.isfinite(stats["grad_norm"]):
                self.optimizer.step()
            else:
                log.warning("non-finite gradient norm: optimizer step skipped")
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            per_step.append(stats)
        keys = {k for s in per_step for k in s}
        return {k: sum(s.get(k, 0.0) for s in per_step) / len(per_step) for k in keys}

    def _clip_gradients(self) -> float:
        from torch.distributed.tensor import DTensor

        max_norm = self.config.optimization.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm if max_norm else math.inf)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)
