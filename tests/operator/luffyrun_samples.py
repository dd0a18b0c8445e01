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


def _rename(path: str, new_key: str) -> Callable[[Obj], None]:
    """A mutation renaming the last key of a dotted path (the value stays)."""

    def mutate(obj: Obj) -> None:
        *parents, leaf = path.split(".")
        node = obj
        for key in parents:
            node = node[key]
        node[new_key] = node.pop(leaf)

    return mutate


_TREQ, _TLIM = "spec.trainer.resources.requests", "spec.trainer.resources.limits"
_RREQ, _RLIM = "spec.rollout.resources.requests", "spec.rollout.resources.limits"
_TENV, _RENV = "spec.trainer.env", "spec.rollout.env"
_MOUNT, _XARGS, _URI = "spec.dataVolume.mountPath", "spec.rollout.extraArgs", "spec.mlflow.trackingUri"
_TOL, _NSEL = "spec.scheduling.tolerations", "spec.scheduling.nodeSelector"

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
    (
        "zero-termination-grace",
        _set("spec.trainer.terminationGracePeriodSeconds", 0),
        "spec.trainer.terminationGracePeriodSeconds",
    ),
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
    ("two-checkpoint-volumes", _set("spec.checkpoint.existingClaim", "ckpt"), "spec.checkpoint"),
    ("no-checkpoint-volume", _set("spec.checkpoint.size", None), "spec.checkpoint"),
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
    # quantities: non-negative, well-formed, within int64, requests at most limits, resource names qualified
    ("negative-memory-limit", _set("spec.trainer.resources", {"limits": {"memory": "-8Gi"}}), _TLIM + ".memory"),
    ("negative-checkpoint-size", _set("spec.checkpoint.size", "-1Gi"), "spec.checkpoint.size"),
    ("negative-integer-cpu", _set("spec.rollout.resources", {"requests": {"cpu": -2}}), _RREQ + ".cpu"),
    ("quantity-beyond-int64", _set("spec.rollout.resources", {"limits": {"cpu": 2**64}}), _RLIM + ".cpu"),
    ("negative-shm", _set("spec.trainer.shmSizeLimit", "-1Gi"), "spec.trainer.shmSizeLimit"),
    ("quantity-with-space", _set("spec.modelCache", {"sizeLimit": "10 Gi"}), "spec.modelCache.sizeLimit"),
    (
        "memory-request-over-limit",
        _set("spec.trainer.resources", {"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}}),
        "spec.trainer.resources",
    ),
    (
        "cpu-request-over-limit-in-millis",
        _set("spec.rollout.resources", {"requests": {"cpu": 2}, "limits": {"cpu": "1500m"}}),
        "spec.rollout.resources",
    ),
    ("empty-resource-name", _set("spec.trainer.resources", {"requests": {"": 1}}), _TREQ),
    ("resource-name-with-space", _set("spec.rollout.resources", {"limits": {"my memory": "1Gi"}}), _RLIM),
    ("empty-gpu-resource-name", _set("spec.scheduling.gpuResourceName", ""), "spec.scheduling.gpuResourceName"),
    # images
    ("blank-image", _set("spec.image", "   "), "spec.image"),
    ("image-with-space", _set("spec.image", "luffy: 0.1.0"), "spec.image"),
    ("image-uppercase-repository", _set("spec.image", "Luffy/Trainer:1"), "spec.image"),
    ("image-with-flags", _set("spec.trainer.image", "luffy:0.1.0 --privileged"), "spec.trainer.image"),
    ("empty-rollout-image", _set("spec.rollout.image", ""), "spec.rollout.image"),
    ("image-trailing-newline", _set("spec.image", "luffy:0.1.0\n"), "spec.image"),
    ("image-short-digest", _set("spec.image", "luffy@sha256:abc"), "spec.image"),
    # GPUs and lengths
    (
        "tensor-parallel-3-on-4-gpus",
        _set("spec.rollout", {"replicas": 1, "gpusPerReplica": 4, "tensorParallelSize": 3}),
        "spec.rollout.tensorParallelSize",
    ),
    ("max-model-len-below-prompt-and-response", _set("spec.rollout.maxModelLen", 100), "spec.rollout.maxModelLen"),
    ("prompt-length-absurd", _set("spec.data.maxPromptLength", 10**8), "spec.data.maxPromptLength"),
    ("warmup-over-total", _set("spec.optimization.warmupSteps", 11), "spec.optimization.warmupSteps"),
    ("beta-above-one", _set("spec.optimization.betas", [1.5, 0.999]), "spec.optimization.betas.0"),
    ("beta-negative", _set("spec.optimization.betas", [0.9, -0.1]), "spec.optimization.betas.1"),
    ("three-betas", _set("spec.optimization.betas", [0.9, 0.99, 0.999]), "spec.optimization.betas"),
    # counts: int64 at least, sensible maxima
    ("million-reward-workers", _set("spec.reward.numWorkers", 1_000_000), "spec.reward.numWorkers"),
    ("thousand-rollout-replicas", _set("spec.rollout.replicas", 1000), "spec.rollout.replicas"),
    ("huge-group", _set("spec.algorithm", {"nOnPolicy": 100_000}), "spec.algorithm.nOnPolicy"),
    ("total-steps-beyond-int64", _set("spec.optimization.totalSteps", 2**64), "spec.optimization.totalSteps"),
    ("seed-beyond-uint32", _set("spec.optimization.seed", 2**40), "spec.optimization.seed"),
    ("keep-no-checkpoint", _set("spec.checkpoint.keepLast", 0), "spec.checkpoint.keepLast"),
    ("thousand-restarts", _set("spec.failurePolicy.maxRestarts", 1000), "spec.failurePolicy.maxRestarts"),
    ("top-k-absurd", _set("spec.rollout.topK", 2**40), "spec.rollout.topK"),
    (
        "toleration-seconds-beyond-int64",
        _set(
            "spec.scheduling.tolerations", [{"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2**64}]
        ),
        "spec.scheduling.tolerations.0.tolerationSeconds",
    ),
    # blank or empty strings where a value is needed
    ("empty-model-path", _set("spec.model.path", ""), "spec.model.path"),
    ("blank-model-path", _set("spec.model.path", "   "), "spec.model.path"),
    ("empty-data-file", _set("spec.data.trainFiles", [""]), "spec.data.trainFiles.0"),
    ("blank-validation-file", _set("spec.data.valFiles", ["  "]), "spec.data.valFiles.0"),
    ("empty-reward-name", _set("spec.reward.name", ""), "spec.reward.name"),
    ("empty-prompt-column", _set("spec.data.luffyColumns", {"prompt": ""}), "spec.data.luffyColumns.prompt"),
    (
        "blank-experiment",
        _set("spec.mlflow", {"trackingUri": "http://mlflow:5000", "experimentName": " "}),
        "spec.mlflow.experimentName",
    ),
    (
        "empty-registered-model",
        _set("spec.mlflow", {"trackingUri": "http://mlflow:5000", "registeredModelName": ""}),
        "spec.mlflow.registeredModelName",
    ),
    # ports the operator uses
    ("weight-sync-on-rendezvous", _set("spec.trainer.weightSyncPort", 29500), "spec.trainer.weightSyncPort"),
    ("weight-sync-range-over-rendezvous", _set("spec.trainer.weightSyncPort", 29499), "spec.trainer.weightSyncPort"),
    ("weight-sync-privileged-port", _set("spec.trainer.weightSyncPort", 80), "spec.trainer.weightSyncPort"),
    # environment variables the operator sets
    ("env-shadows-pythonunbuffered", _set("spec.trainer.env", [{"name": "PYTHONUNBUFFERED", "value": "0"}]), _TENV),
    ("env-shadows-master-port", _set("spec.rollout.env", [{"name": "MASTER_PORT", "value": "1"}]), _RENV),
    ("env-shadows-hf-home", _set("spec.rollout.env", [{"name": "HF_HOME", "value": "/x"}]), _RENV),
    ("env-name-with-space", _set("spec.trainer.env", [{"name": "MY VAR", "value": "1"}]), _TENV + ".0.name"),
    (
        "env-secret-key-with-slash",
        _set("spec.trainer.env", [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "a/b"}}}]),
        _TENV + ".0.valueFrom.secretKeyRef.key",
    ),
    # mount paths the operator owns
    ("data-over-config-mount", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/etc/luffy"}), _MOUNT),
    ("data-inside-checkpoints", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/checkpoints/d"}), _MOUNT),
    ("data-over-etc", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/etc"}), _MOUNT),
    ("data-over-tmp", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/tmp"}), _MOUNT),
    ("data-mount-dotdot", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/data/../models"}), _MOUNT),
    ("data-mount-relative", _set("spec.dataVolume", {"claimName": "d", "mountPath": "data"}), _MOUNT),
    ("data-mount-root", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/"}), _MOUNT),
    ("data-over-control-token", _set("spec.dataVolume", {"claimName": "d", "mountPath": "/var/run/luffy"}), _MOUNT),
    # extraArgs that collide with flags the operator sets
    ("extra-arg-max-model-len", _set("spec.rollout.extraArgs", ["--max-model-len=99999"]), _XARGS),
    ("extra-arg-port", _set("spec.rollout.extraArgs", ["--port", "9000"]), _XARGS),
    ("extra-arg-api-key", _set("spec.rollout.extraArgs", ["--api-key=guessable"]), _XARGS),
    ("extra-arg-underscored", _set("spec.rollout.extraArgs", ["--tensor_parallel_size=2"]), _XARGS),
    ("extra-arg-short-tp", _set("spec.rollout.extraArgs", ["-tp", "2"]), _XARGS),
    ("extra-arg-served-name", _set("spec.rollout.extraArgs", ["--served-model-name=other"]), _XARGS),
    ("extra-arg-trust-remote-code", _set("spec.rollout.extraArgs", ["--trust-remote-code"]), _XARGS),
    ("extra-arg-no-enforce-eager", _set("spec.rollout.extraArgs", ["--no-enforce-eager"]), _XARGS),
    ("extra-arg-empty", _set("spec.rollout.extraArgs", [""]), _XARGS),
    # tolerations, node selectors, names and queues as Kubernetes defines them
    ("toleration-key-with-space", _set("spec.scheduling.tolerations", [{"key": "gpu node"}]), _TOL + ".0.key"),
    ("toleration-equal-without-key", _set("spec.scheduling.tolerations", [{"value": "x"}]), _TOL + ".0.operator"),
    (
        "toleration-exists-with-value",
        _set("spec.scheduling.tolerations", [{"key": "g", "operator": "Exists", "value": "x"}]),
        _TOL + ".0.value",
    ),
    (
        "toleration-seconds-not-noexecute",
        _set("spec.scheduling.tolerations", [{"key": "g", "tolerationSeconds": 5}]),
        _TOL + ".0.tolerationSeconds",
    ),
    ("toleration-bad-value", _set("spec.scheduling.tolerations", [{"key": "g", "value": "a b"}]), _TOL + ".0.value"),
    ("node-selector-key-with-space", _set("spec.scheduling.nodeSelector", {"gpu type": "h100"}), _NSEL),
    ("node-selector-key-too-long", _set("spec.scheduling.nodeSelector", {"k" * 64: "x"}), _NSEL),
    ("node-selector-bad-prefix", _set("spec.scheduling.nodeSelector", {"Example.COM/gpu": "x"}), _NSEL),
    ("node-selector-key-trailing-newline", _set("spec.scheduling.nodeSelector", {"gpu\n": "x"}), _NSEL),
    ("node-selector-bad-value", _set("spec.scheduling.nodeSelector", {"gpu": "-h100"}), _NSEL + ".gpu"),
    ("queue-name-with-space", _set("spec.scheduling.queueName", "team a"), "spec.scheduling.queueName"),
    ("queue-name-underscore", _set("spec.scheduling.queueName", "team_a"), "spec.scheduling.queueName"),
    ("queue-name-too-long", _set("spec.scheduling.queueName", "q" * 64), "spec.scheduling.queueName"),
    (
        "priority-class-uppercase",
        _set("spec.scheduling.priorityClassName", "High"),
        "spec.scheduling.priorityClassName",
    ),
    (
        "storage-class-with-space",
        _set("spec.checkpoint.storageClassName", "fast ssd"),
        "spec.checkpoint.storageClassName",
    ),
    ("pull-secret-underscore", _set("spec.imagePullSecrets", ["my_secret"]), "spec.imagePullSecrets.0"),
    # URIs: scheme, host, port
    ("mlflow-port-not-a-number", _set("spec.mlflow", {"trackingUri": "http://mlflow:abc"}), _URI),
    ("mlflow-uri-text-after-space", _set("spec.mlflow", {"trackingUri": "http://mlflow:5000 extra"}), _URI),
    ("mlflow-port-out-of-range", _set("spec.mlflow", {"trackingUri": "http://mlflow:70000"}), _URI),
    ("mlflow-uri-with-credentials", _set("spec.mlflow", {"trackingUri": "http://user:pw@mlflow:5000"}), _URI),
    ("mlflow-uri-without-host", _set("spec.mlflow", {"trackingUri": "https://"}), _URI),
    (
        "mlflow-credentials-key-empty",
        _set(
            "spec.mlflow", {"trackingUri": "http://mlflow:5000", "credentialsSecret": {"name": "m", "usernameKey": ""}}
        ),
        "spec.mlflow.credentialsSecret.usernameKey",
    ),
    (
        "best-alias-without-model",
        _set("spec.mlflow", {"trackingUri": "http://mlflow:5000", "bestModelAlias": "best"}),
        "spec.mlflow.bestModelAlias",
    ),
    # strict types and camelCase keys, as the API server reads a manifest
    ("replicas-as-string", _set("spec.rollout.replicas", "2"), "spec.rollout.replicas"),
    ("suspend-as-string", _set("spec.suspend", "true"), "spec.suspend"),
    ("lr-as-string", _set("spec.optimization.lr", "1e-6"), "spec.optimization.lr"),
    ("bool-as-integer", _set("spec.model.trustRemoteCode", 1), "spec.model.trustRemoteCode"),
    ("float-as-bool", _set("spec.rollout.temperature", True), "spec.rollout.temperature"),
    ("snake-case-section", _rename("spec.failurePolicy", "failure_policy"), "spec.failure_policy"),
    ("snake-case-field", _set("spec.rollout.gpus_per_replica", 0), "spec.rollout.gpus_per_replica"),
]


def invalid_run(case_id: str, name: str = "demo") -> Obj:
    obj = valid_run(name)
    mutate = next(m for cid, m, _ in INVALID_CASES if cid == case_id)
    mutate(obj)
    return obj


def _normal(text: str) -> str:
    """Lowercase, list indices as path segments (`env[0]` is `env.0`), only letters, digits and dots."""
    return re.sub(r"[^a-z0-9.]", "", re.sub(r"\[(\d+)\]", r".\1", text).lower())


def names_field(text: str, field: str) -> bool:
    """Whether an error text reports a problem at `field` or below it: some `path: problem` line (the API server's,
    or one of the operator's `; `-separated ones) has a path that is `field` or starts with it."""
    target = _normal(field)
    for line in re.split(r"^invalid spec: |; (?=spec\b|metadata\b)", text):
        path = _normal(line.partition(": ")[0])
        if path == target or path.startswith(target + "."):
            return True
    return False
