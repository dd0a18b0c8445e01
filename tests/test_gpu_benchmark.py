"""benchmarks/gpu.py: its FLOP count against a hand computation, its Qwen2.5 shapes against the published parameter
counts, and its `--cpu --tiny` mode run for real through the device command (benchmarks/gpu_device.sh) with the
packages the GPU machine lacks made unimportable. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not on the GPU machine (vLLM cannot travel there; pydantic can, and is carried): importing any of them must fail.
ABSENT_ON_DEVICE = ("vllm", "mlflow", "math_verify", "kopf", "kmock", "datasets", "pandas", "accelerate")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


gpu = _load_benchmark()


def test_train_flops_by_hand():
    # h = 8, 2 layers, 2 heads of dim 4, 1 KV head, MLP 16, V = 10; two sequences of 3 and 5 tokens.
    shape = gpu.Shape(8, 2, 2, 1, 16, vocab_size=10)
    mlp = 3 * 8 * 16  # gate, up, down: 384
    attention_linear = 8 * (8 + 4 + 4 + 8)  # q, k, v, o: 192
    dense = 2 * (mlp + attention_linear) + 2 * 10 * 8  # 1152 + 160 = 1312
    attention = 12 * (3 * 3 + 5 * 5) * 4 * 2 * 2  # 6528
    assert gpu.train_flops(shape, [3, 5]) == 6 * dense * 8 + attention == 69_504


@pytest.mark.parametrize(
    ("name", "total", "non_embedding"), [("qwen2.5-0.5b", 0.49, 0.36), ("qwen2.5-1.5b", 1.54, 1.31)]
)
def test_shapes_have_qwen25_parameter_counts(name, total, non_embedding):
    """The model cards' counts (billions): the shapes are the published ones."""
    shape = gpu.SHAPES[name]
    model = gpu.qwen2_model(shape, "meta", 0)
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    assert shape.vocab_size == 151_936 and model.config.tie_word_embeddings
    assert round(params / 1e9, 2) == total
    assert round((params - shape.vocab_size * shape.hidden_size) / 1e9, 2) == non_embedding


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """One `--cpu --tiny` run of the device command, in a Python where the device's missing packages fail to import."""
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_DEVICE)
    )
    out = tmp_path_factory.mktemp("gpu-out")
    env = {
        **os.environ,
        "PYTHON": str(Path(sys.executable)),
        "GPU_DEPS": "",  # this interpreter has pydantic; the device gets it from `make gpu-deps`
        "OUT": str(out),
        "PYTHONPATH": f"{blocker}:{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_device.sh"), "--cpu", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "gpu.log").read_text().count("done in") == 4
    return json.loads((out / "gpu.json").read_text())


def test_blocked_packages_really_fail_to_import(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_report_describes_the_run(report):
    assert report["mode"] == "cpu-tiny"
    assert report["environment"]["peak_tflops"] == gpu.H200_BF16_TFLOPS
    assert set(report["shapes"]) == {"tiny"}
    assert set(report["section_seconds"]) == set(gpu.SECTIONS)


def test_update_rows(report):
    rows = report["update"]
    plan, shape = gpu.TINY, gpu.SHAPES["tiny"]
    assert [r["gradient_checkpointing"] for r in rows] == [True, False]
    samples = 8 * plan.prompts  # 7 rollouts + 1 trace per prompt
    seq = plan.prompt_len + plan.response_len
    for row in rows:
        assert "error" not in row, row
        assert row["samples_per_step"] == samples
        assert row["tokens_per_step"] == samples * seq
        assert row["flops_per_step"] == gpu.train_flops(shape, [seq] * samples)
        assert len(row["step_seconds"]) == plan.steps
        assert row["tokens_per_s"] > 0
        assert 0 < row["mfu"] <= 1
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert row["peak_rss_gb"] > 0
    # Same weights and batch in float32: checkpointing recomputes the same activations, so the step is the same.
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)


def test_logprob_rows(report):
    rows = {r["variant"]: r for r in report["logprobs"]}
    assert set(rows) == {"naive", "chunked"}
    for row in rows.values():
        assert row["vocab"] == gpu.TINY.logprob_vocab and row["tokens"] == gpu.TINY.logprob_tokens
        assert row["peak_mb"] > 0
    # [T, V] float32 logits are 16 MB here; the chunked head holds a few [chunk, V] buffers instead.
    assert rows["chunked"]["peak_mb"] < rows["naive"]["peak_mb"] / 2


def test_generation_row(report):
    (row,) = report["generation"]
    plan = gpu.TINY
    assert 0 < row["generated_tokens"] <= plan.gen_prompts * plan.gen_n * plan.gen_tokens
    assert row["tokens_per_s"] > 0


def test_correctness_within_tolerance(report):
    check = report["correctness"]
    assert check["reference_dtype"] == check["device_dtype"] == "float32"
    assert math.isfinite(check["loss_reference"]) and check["grad_norm_reference"] > 0
    assert check["within_tolerance"], check
    assert check["grad_rel_l2_error"] <= check["grad_tolerance"] == 1e-4
    assert check["grad_cosine"] > 0.9999
