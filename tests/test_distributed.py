"""torchrun with 2 CPU ranks (gloo, FSDP2) against one process: same losses, same parameters, resharded resumes.

The parameter comparisons use SGD with momentum (update linear in the gradient, state in the checkpoint): with
AdamW the first update is about lr * sign(gradient), which turns float noise in near-zero gradients into visible
differences. A separate AdamW run checks the losses and a looser parameter bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(tmp: Path, name: str, ranks: int, *args: str) -> dict:
    out = tmp / f"{name}.pt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    if ranks == 1:
        launcher = [sys.executable]
    proc = subprocess.run(
        [*launcher, str(WORKER), "--out", str(out), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _assert_same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dist")
    common = ["--model", tiny_model_dir, "--steps", "2", "--save-after", "1", "--optimizer", "sgd"]
    one = _run(tmp, "one", 1, *common, "--ckpt-dir", str(tmp / "ckpt1"))
    two = _run(tmp, "two", 2, *common, "--ckpt-dir", str(tmp / "ckpt2"))
    return tmp, one, two


def test_two_ranks_match_one_process(runs):
    _, one, two = runs
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for step in (1, 2):
        for key in ("loss", "pg_loss", "on_policy_loss", "off_policy_loss", "entropy", "grad_norm"):
            assert two["metrics"][step][key] == pytest.approx(one["metrics"][step][key], rel=1e-5), (step, key)
        assert two["metrics"][step]["on_policy_tokens"] == one["metrics"][step]["on_policy_tokens"]
    _assert_same_params(one["params"], two["params"], atol=1e-5)


@pytest.mark.parametrize(("written_by", "resumed_on"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(runs, tiny_model_dir, written_by, resumed_on):
    tmp, one, two = runs
    writer = {1: one, 2: two}[written_by]
    resumed = _run(
        tmp,
        f"{written_by}_to_{resumed_on}",
        resumed_on,
        *["--model", tiny_model_dir, "--steps", "2", "--optimizer", "sgd"],
        *["--resume-from", str(tmp / f"ckpt{written_by}" / "step_000001"), "--ckpt-dir", str(tmp / "unused")],
    )
    assert resumed["world_size"] == resumed_on
    assert list(resumed["metrics"]) == [2]
    assert resumed["metrics"][2]["loss"] == pytest.approx(writer["metrics"][2]["loss"], rel=1e-5)
    _assert_same_params(writer["params"], resumed["params"], atol=1e-5)


def test_adamw_two_ranks_match_one_process(tmp_path, tiny_model_dir):
    common = ["--model", tiny_model_dir, "--steps", "1", "--optimizer", "adamw"]
    one = _run(tmp_path, "adam1", 1, *common)
    two = _run(tmp_path, "adam2", 2, *common)
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert two["metrics"][1][key] == pytest.approx(one["metrics"][1][key], rel=1e-5)
    # One AdamW step moves each weight by about lr = 1e-2; the ranks agree far below that.
    _assert_same_params(one["params"], two["params"], atol=1e-3)


def test_two_rank_training_against_a_rollout_server(tmp_path, tiny_model_dir, tiny_run_config):
    """The cluster path end to end: 2 torchrun ranks (FSDP2, gloo) train against a real `luffy serve-rollout`,
    push their sharded weights to it every step, validate, keep the best model, and the server ends up serving exactly
    the saved final model."""
    import json
    import urllib.request

    import yaml
    from luffy_trainer.demo.tasks import write_arithmetic_task
    from luffy_trainer.rollout.serve import LocalRolloutServer
    from rollout_reference import hf_greedy
    from servers import free_port

    data = write_arithmetic_task(tmp_path / "data", n_base=8, n_train=32, seed=2, val_per_total=1)
    config = tiny_run_config(
        data,
        model={"gradientCheckpointing": True},
        rollout={"backend": "vllm-server"},
        optimization={"lr": 1e-2, "totalSteps": 2},
        checkpoint={"everySteps": 1},
        validation={"everySteps": 1, "samplesPerPrompt": 1, "maxTokens": 16},
        tracking={"trackingUri": f"sqlite:///{tmp_path}/mlflow.db", "logModel": False},
    )
    server = LocalRolloutServer(tiny_model_dir, free_port(), log_path=tmp_path / "server.log", max_model_len=128)
    config["rollout"].update(serverUrls=[server.url], weightSyncPort=free_port())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    server.start()
    try:
        server.wait_healthy()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "luffy_trainer.cli",
                "train",
                str(tmp_path / "run.yaml"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        rank0 = "\n".join(line for line in proc.stderr.splitlines() if "rank0" in line or "rank 0" in line)
        assert proc.returncode == 0, rank0[-4000:] or proc.stderr[-4000:]
        assert (tmp_path / "ckpt" / "step_000002").is_dir()
        # Validation ran on rank 0 and both ranks gathered the first (hence best) model for rank 0 to write.
        assert (tmp_path / "out" / "best" / "model.safetensors").is_file()
        final = str(tmp_path / "out" / "final")
        prompt = [1, 87, 85, 278, 201, 289, 266, 223, 20]
        request = urllib.request.Request(
            f"{server.url}/v1/completions",
            data=json.dumps(
                {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "return_token_ids": True}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.load(response)["choices"][0]["token_ids"]
        assert served == hf_greedy(final, prompt, max_tokens=12)
        assert served != hf_greedy(tiny_model_dir, prompt, max_tokens=12)  # the weights really moved
    finally:
        server.stop()


def _objective_by_hand(
    model_dir: str, samples: list[dict], mode: str, scale: str, ranks: int
) -> dict[str, torch.Tensor]:
    """The mini-batch objective of one group, written out from the formulas, and its gradient by autograd.

    Group: rewards 1, 0, 0 for the rollouts and 1 for the trace. `luffy` centres all four (A = 1/2, -1/2, -1/2, 1/2)
    and shapes the trace's tokens with f(p) = p / (p + 0.1); `rl_sft_loss` centres the rollouts only
    (A = 2/3, -1/3, -1/3) and adds the trace's NLL. L = 32 (maxResponseLength), entropy coefficient 0.01.
    released:  (1/W) * [sum_i sum_t l_it / L  -  0.01 * sum_i mean_t H_it  +  sum_trace mean_t NLL_t]
    invariant:          sum_i sum_t l_it / L  -  0.01 * (sum_it H_it / sum_i T_i)  +  sum_t NLL_t / T_trace
    (each sample is a micro-batch of its own, so a micro-batch mean is a per-sample mean).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    advantages = [0.5, -0.5, -0.5, 0.5] if mode == "luffy" else [2 / 3, -1 / 3, -1 / 3, 0.0]
    pg = entropy_means = nll_means = entropy_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for sample, advantage in zip(samples, advantages, strict=True):
        ids = torch.tensor([sample["prompt"] + sample["response"]])
        logits = model(input_ids=ids).logits[0, len(sample["prompt"]) - 1 : -1].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        logp = log_probs.gather(-1, torch.tensor(sample["response"])[:, None])[:, 0]
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy_means = entropy_means + entropy.mean()
        entropy_sum, tokens = entropy_sum + entropy.sum(), tokens + len(sample["response"])
        if sample["off"] and mode == "rl_sft_loss":
            nll_means = nll_means - logp.mean()
        elif sample["off"]:
            p = logp.exp()
            pg = pg - (advantage * p / (p + 0.1)).sum()
        else:
            pg = pg - (advantage * torch.exp(logp - logp.detach())).sum()
    if scale == "released":
        objective = (pg / 32 - 0.01 * entropy_means + nll_means) / ranks
    else:
        objective = pg / 32 - 0.01 * entropy_sum / tokens + nll_means
    objective.backward()
    return {"loss": objective.detach(), **{name: p.grad.float() for name, p in model.named_parameters()}}


def test_released_loss_scale_equals_its_formula_on_two_ranks(tmp_path, tiny_model_dir):
    """2 ranks x 2 micro-batches, one SGD step of lr 1: the update is minus the gradient of the objective."""
    cases = ["luffy:released", "rl_sft_loss:released", "luffy:invariant"]
    result = _run(tmp_path, "scales", 2, "--model", tiny_model_dir, "--loss-scale-cases", *cases)
    assert result["world_size"] == 2
    for case in cases:
        mode, scale = case.split(":")
        run = result["cases"][case]
        expected = _objective_by_hand(tiny_model_dir, run["samples"], mode, scale, ranks=2)
        assert run["metrics"]["loss"] == pytest.approx(float(expected.pop("loss")), abs=1e-6), case
        for name, grad in expected.items():
            torch.testing.assert_close(run["before"][name] - run["after"][name], grad, atol=1e-6, rtol=0, msg=case)
        assert max(float(g.abs().max()) for g in expected.values()) > 1e-3  # the comparison is not vacuous
