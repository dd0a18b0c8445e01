"""Runs the trainer's policy update on fixed batches, alone or as a torchrun rank (used by test_distributed.py).

Every rank builds the same synthetic rollout batches (seeded), trains on its share through the trainer's own
build_policy / PolicyUpdater / CheckpointManager, and rank 0 writes the step metrics and the full parameters.
With `--loss-scale-cases`, each case is one group (3 rollouts and a trace) trained for one plain SGD step with every
sample in a micro-batch of its own, and rank 0 writes the samples with the parameters before and after, for a test to
compare with the objective written out by hand.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from luffy_trainer.checkpoint import CheckpointManager
from luffy_trainer.config import parse_config
from luffy_trainer.distributed import device_of, full_parameters, init_distributed
from luffy_trainer.groups import GroupInput, build_samples
from luffy_trainer.policy import PolicyUpdater, build_optimizer, build_policy


def synthetic_batch(step: int, prompts: int, n_on: int, vocab: int):
    """A rollout batch with rewards of every kind: all, some and none of a group's rollouts solved."""
    rng = random.Random(1000 + step)

    def tokens(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] + [2]

    groups = []
    for g in range(prompts):
        solved = g % (n_on + 1)
        groups.append(
            GroupInput(
                prompt_ids=tokens(3, 9),
                rollouts=[tokens(2, 12) for _ in range(n_on)],
                rollout_rewards=[1.0] * solved + [0.0] * (n_on - solved),
                rollout_truncated=[False] * n_on,
                trace_ids=tokens(5, 14),
                trace_reward=1.0,
            )
        )
    return groups


def loss_scale_case(args, world, device, mode: str, scale: str) -> dict:
    """One SGD step (lr 1, no clip) on one group: 4 samples, 2 per rank, each its own micro-batch."""
    config = parse_config(
        {
            "model": {"path": args.model, "dtype": "float32", "gradient_checkpointing": False},
            "algorithm": {"mode": mode, "n_on_policy": 3, "entropy_coeff": 0.01, "loss_scale": scale},
            "optimization": {
                "prompts_per_step": 1,
                "optimizer_steps_per_batch": 1,
                "micro_batch_tokens": 1,
                "grad_clip": None,
            },
            "data": {"max_response_length": 32},
        }
    )
    torch.manual_seed(0)
    tokenizer, policy = build_policy(config, world, device)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    updater = PolicyUpdater(policy, optimizer, scheduler, config, tokenizer.pad_token_id, world, device)
    rng = random.Random(7)
    group = GroupInput(
        prompt_ids=[rng.randrange(3, len(tokenizer)) for _ in range(5)],
        rollouts=[[rng.randrange(3, len(tokenizer)) for _ in range(n)] + [2] for n in (3, 6, 4)],
        rollout_rewards=[1.0, 0.0, 0.0],
        rollout_truncated=[False] * 3,
        trace_ids=[rng.randrange(3, len(tokenizer)) for _ in range(8)] + [2],
        trace_reward=1.0,
    )
    samples = build_samples([group], config.algorithm)
    before = {name: t.clone() for name, t in full_parameters(policy, prefix="lm.")}
    metrics = updater.optimize(samples)
    after = {name: t.clone() for name, t in full_parameters(policy, prefix="lm.")}
    return {
        "samples": [
            {"prompt": list(s.prompt_ids), "response": list(s.response_ids), "off": s.off_policy} for s in samples
        ],
        "metrics": metrics,
        "before": before,
        "after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1, help="train steps 1..N")
    parser.add_argument("--save-after", type=int, default=0, help="checkpoint after this step")
    parser.add_argument("--resume-from", default=None, help="checkpoint directory to start from")
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="sgd: an update linear in the gradient, so ranks can be compared to float precision",
    )
    parser.add_argument("--loss-scale-cases", nargs="*", default=None, metavar="MODE:SCALE")
    args = parser.parse_args()

    world = init_distributed(timeout_s=300)
    device = device_of(world)
    if args.loss_scale_cases is not None:
        cases = {c: loss_scale_case(args, world, device, *c.split(":")) for c in args.loss_scale_cases}
        if world.is_main:
            torch.save({"cases": cases, "world_size": world.world_size}, args.out)
        if world.distributed:
            torch.distributed.destroy_process_group()
        return
    config = parse_config(
        {
            "model": {"path": args.model, "dtype": "float32", "gradient_checkpointing": True},
            "algorithm": {"mode": "luffy", "n_on_policy": 3, "clip_eps": 0.2, "entropy_coeff": 0.01},
            "optimization": {
                "lr": 1e-2,
                "prompts_per_step": 6,
                "optimizer_steps_per_batch": 2,
                "micro_batch_tokens": 60,
                "seed": 3,
            },
            "data": {"max_response_length": 32},
        }
    )
    torch.manual_seed(0)
    tokenizer, policy = build_policy(config, world, device)
    optimizer, scheduler = build_optimizer(policy, config)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    updater = PolicyUpdater(policy, optimizer, scheduler, config, tokenizer.pad_token_id, world, device)
    checkpoints = CheckpointManager(args.ckpt_dir or Path(args.out).parent / "ckpt", keep_last=3)
    first = 1
    if args.resume_from:
        state = checkpoints.load(Path(args.resume_from), policy, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        first = state["step"] + 1
    metrics = {}
    for step in range(first, args.steps + 1):
        samples = build_samples(synthetic_batch(step, 6, 3, len(tokenizer)), config.algorithm)
        metrics[step] = updater.optimize(samples)
        if step == args.save_after:
            checkpoints.save(step, policy, optimizer, {"scheduler": scheduler.state_dict()})
    params = {name: t.clone() for name, t in full_parameters(policy, prefix="lm.")}
    if world.is_main:
        torch.save({"metrics": metrics, "params": params, "world_size": world.world_size}, args.out)
    if world.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
