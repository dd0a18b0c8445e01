"""LuffyRun objects for the operator tests: one valid run and invalid variants, each naming the field at fault."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]


def valid_run(name: str = "demo", namespace: str = "default", **spec_overrides: Any) -> Obj:
    """A small valid LuffyRun on CPU: 2 rollout replicas, 1 trainer node, a new 1Gi checkpoint PVC."""
    spec: Obj = {
        "image": "luffy:0.1.0",
        "model": {"path": "/workspace/model", "dtype": "float32"},
        "data": {"trainFiles": ["/workspace/data/train.parquet"], "maxPromptLength": 64, "maxResponseLength": 64},
        "optimization": {"promptsPerStep": 16, "optimizerStepsPerBatch": 1, "totalSteps": 10},
        "rollout": {"replicas": 2, "gpusPerReplica": 0},
        "trainer": {"nodes": 1, "gpusPerNode": 0},
        "checkpoint": {"size": "1Gi", "everySteps": 5},
        "failurePolicy": {"maxRestarts": 1},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "luffy.dev/v1alpha1",
        "kind": "LuffyRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _set(path: str, value: Any) -> Callable[[Obj], None]:
    """A mutation setting a dotted path (created as needed); the value None deletes the key."""

    def mutate(obj: Obj) -> None:
        *parents, leaf = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)

    return mutate


# (id, mutation of valid_run(), the field a rejection must name)
INVALID_CASES: list[tuple[str, Callable[[Obj], None], str]] = [
    ("no-image", _set("spec.image", None), "spec.image"),
    ("no-model-path", _set("spec.model", {"dtype": "float32"}), "spec.model.path"),
    ("empty-train-files", _set("spec.data.trainFiles", []), "spec.data.trainFiles"),
    ("unknown-mode", _set("spec.algorithm", {"mode": "ppo"}), "spec.algorithm.mode"),
    ("gamma-zero", _set("spec.algorithm", {"gamma": 0}), "spec.algorithm.gamma"),
    ("luffy-without-on-policy", _set("spec.algorithm", {"mode": "luffy", "nOnPolicy": 0}), "spec.algorithm.nOnPolicy"),
    (
        "clip-bounds-crossed",
        _set("spec.algorithm", {"offPolicyMinClip": 2.0, "offPolicyMaxClip": 1.0}),
        "spec.algorithm.offPolicyMinClip",
    ),
    (
        "minibatches-do-not-divide",
        _set("spec.optimization", {"promptsPerStep": 10, "optimizerStepsPerBatch": 3}),
        "spec.optimization.promptsPerStep",
    ),
    ("negative-lr", _set("spec.optimization.lr", -1.0), "spec.optimization.lr"),
    (
        "released-scale-of-token-mean",
        _set("spec.algorithm", {"lossScale": "released", "aggregation": "token-mean"}),
        "spec.algorithm.lossScale",
    ),
    (
        "sft-with-validation",
        lambda obj: (
            _set("spec.algorithm", {"mode": "sft", "nOnPolicy": 0})(obj),
            _set("spec.data.valFiles", ["/workspace/data/val.parquet"])(obj),
        ),
        "spec.data.valFiles",
    ),
    ("zero-rollout-replicas", _set("spec.rollout.replicas", 0), "spec.rollout.replicas"),
    (
        "tensor-parallel-over-gpus",
        _set("spec.rollout", {"replicas": 1, "gpusPerReplica": 1, "tensorParallelSize": 2}),
        "spec.rollout.tensorParallelSize",
    ),
    ("top-p-above-one", _set("spec.rollout.topP", 1.5), "spec.rollout.topP"),
    ("zero-trainer-nodes", _set("spec.trainer.nodes", 0), "spec.trainer.nodes"),
    ("gpus-not-a-number", _set("spec.trainer.gpusPerNode", "eight"), "spec.trainer.gpusPerNode"),
    (
        "reserved-env",
        _set("spec.trainer.env", [{"name": "LUFFY_RUN_NAME", "value": "elsewhere"}]),
        "spec.trainer.env",
    ),
    (
        "env-value-and-source",
        _set(
            "spec.rollout.env",
            [{"name": "HF_TOKEN", "value": "x", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        ),
        "spec.rollout.env",
    ),
    ("two-checkpoint-volumes", _set("spec.checkpoint.existingClaim", "ckpt"), "spec.checkpoint.existingClaim"),
    ("no-checkpoint-volume", _set("spec.checkpoint.size", None), "spec.checkpoint.size"),
    ("bad-quantity", _set("spec.checkpoint.size", "lots"), "spec.checkpoint.size"),
    ("multi-node-rwo", _set("spec.trainer.nodes", 2), "spec.checkpoint.accessMode"),
    ("file-tracking-uri", _set("spec.mlflow", {"trackingUri": "file:///tmp/mlruns"}), "spec.mlflow.trackingUri"),
    ("mlflow-without-uri", _set("spec.mlflow", {"experimentName": "x"}), "spec.mlflow.trackingUri"),
    (
        "bad-toleration-operator",
        _set("spec.scheduling", {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}),
        "spec.scheduling.tolerations",
    ),
    ("name-too-long", _set("metadata.name", "r" * 50), "metadata.name"),
    ("name-starts-with-digit", _set("metadata.name", "9lives"), "metadata.name"),
    ("typo-field", _set("spec.algorithm", {"gama": 0.1}), "spec.algorithm.gama"),
    (
        "gpu-as-resource",
        _set("spec.trainer.resources", {"limits": {"nvidia.com/gpu": 8}}),
        "spec.trainer.resources",
    ),
    ("pull-policy", _set("spec.imagePullPolicy", "Sometimes"), "spec.imagePullPolicy"),
    ("cleanup-action", _set("spec.cleanup", {"onSuccess": "Explode"}), "spec.cleanup.onSuccess"),
    ("data-format", _set("spec.data.format", "csv"), "spec.data.format"),
    (
        "sft-without-traces",
        _set("spec.algorithm", {"mode": "sft", "nOffPolicy": 0}),
        "spec.algorithm.nOffPolicy",
    ),
]


def invalid_run(case_id: str, name: str = "demo") -> Obj:
    obj = valid_run(name)
    mutate = next(m for cid, m, _ in INVALID_CASES if cid == case_id)
    mutate(obj)
    return obj


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", text.lower())


def names_field(text: str, field: str) -> bool:
    """Whether an error text points at `field`: its dotted path, or its parent path and its name (any casing)."""
    flat = _normal(text)
    if _normal(field) in flat:
        return True
    parent, _, leaf = field.rpartition(".")
    return _normal(parent) in flat and _normal(leaf) in flat
