"""The LuffyRun CustomResourceDefinition, generated from the models in `api.py` (`luffy-operator crd`, `make crd`).

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, `nullable`
instead of `anyOf` with null, boolean `exclusiveMinimum`, no `additionalProperties: false` next to `properties`
(unknown fields are pruned, and rejected by kubectl's strict field validation). `to_structural` does that conversion;
CEL rules (`x-kubernetes-validations`) cover what a schema cannot say, including which fields are immutable.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from luffy_trainer.contract import API_VERSION, GROUP, KIND, PLURAL, RENDEZVOUS_PORT, VERSION

from luffy_operator.api import (
    CATEGORIES,
    MUTABLE_PATHS,
    REQUIRED_FIELDS,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    SHORT_NAMES,
    SINGULAR,
    LuffyRun,
)
from luffy_operator.fields import Cel

Schema = dict[str, Any]

_RESERVED_ENV_RULE = " && ".join(
    [f"!(e.name in [{', '.join(repr(n) for n in sorted(RESERVED_ENV_NAMES))}])"]
    + [f"!e.name.startsWith('{prefix}')" for prefix in RESERVED_ENV_PREFIXES]
)


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    return Cel(rule, message, field_path).as_schema_extra()


def _env_rules(where: str) -> list[dict[str, str]]:
    return [
        _rule(
            f"self.all(e, {_RESERVED_ENV_RULE})",
            f"{where}: names starting with {' or '.join(RESERVED_ENV_PREFIXES)} and "
            f"{', '.join(sorted(RESERVED_ENV_NAMES))} are set by the operator",
        ),
        _rule(
            "self.all(e, !(has(e.value) && has(e.valueFrom)))",
            f"{where}: set value or valueFrom, not both",
        ),
    ]


def _no_gpu_in_resources(component: str, count_field: str) -> dict[str, str]:
    res, gpu = f"self.{component}.resources", "self.scheduling.gpuResourceName"
    return _rule(
        f"(!has({res}.limits) || !({gpu} in {res}.limits)) && (!has({res}.requests) || !({gpu} in {res}.requests))",
        f"set GPUs with spec.{component}.{count_field}, not as a resource",
        f".{component}.resources",
    )


# Rules a schema cannot express, keyed by the schema path they sit on. Each restates a validator of the models
# (which the operator applies too, for API servers without CEL or objects created before the CRD).
CEL_RULES: dict[tuple[str, ...], list[dict[str, str]]] = {
    ("spec",): [
        _rule(
            "self.trainer.nodes == 1 || has(self.checkpoint.existingClaim) "
            "|| self.checkpoint.accessMode == 'ReadWriteMany'",
            "must be ReadWriteMany when spec.trainer.nodes > 1",
            ".checkpoint.accessMode",
        ),
        _no_gpu_in_resources("trainer", "gpusPerNode"),
        _no_gpu_in_resources("rollout", "gpusPerReplica"),
        _rule(
            "!has(self.algorithm) || !has(self.algorithm.mode) || self.algorithm.mode != 'sft' "
            "|| !has(self.data.valFiles) || size(self.data.valFiles) == 0",
            "mode sft starts no rollout servers to validate with; evaluate with luffy eval",
            ".data.valFiles",
        ),
        _rule(
            "!has(self.rollout.maxModelLen) "
            "|| self.rollout.maxModelLen >= self.data.maxPromptLength + self.data.maxResponseLength",
            "must hold spec.data.maxPromptLength + maxResponseLength",
            ".rollout.maxModelLen",
        ),
        _rule(
            "(has(self.algorithm.mode) && self.algorithm.mode == 'sft') "
            f"|| self.trainer.weightSyncPort > {RENDEZVOUS_PORT} "
            f"|| self.trainer.weightSyncPort + self.rollout.replicas <= {RENDEZVOUS_PORT}",
            f"the weight-sync ports (one per rollout replica) include the rendezvous port {RENDEZVOUS_PORT}",
            ".trainer.weightSyncPort",
        ),
    ],
    ("spec", "algorithm"): [
        _rule(
            "!(self.mode in ['luffy', 'grpo', 'rl_sft_loss']) || self.nOnPolicy >= 1",
            "must be at least 1 in modes luffy, grpo and rl_sft_loss",
            ".nOnPolicy",
        ),
        _rule(
            "!(self.mode in ['luffy', 'sft', 'rl_sft_loss']) || self.nOffPolicy >= 1",
            "must be at least 1 in modes luffy, sft and rl_sft_loss",
            ".nOffPolicy",
        ),
        _rule(
            "!has(self.offPolicyMaxClip) || !has(self.offPolicyMinClip) "
            "|| self.offPolicyMinClip <= self.offPolicyMaxClip",
            "must not exceed offPolicyMaxClip",
            ".offPolicyMinClip",
        ),
        _rule(
            "!has(self.lossScale) || self.lossScale != 'released' || !has(self.aggregation) "
            "|| self.aggregation == 'token-sum'",
            "'released' scales the token-sum aggregation only",
            ".lossScale",
        ),
    ],
    ("spec", "optimization"): [
        _rule(
            "self.promptsPerStep % self.optimizerStepsPerBatch == 0",
            "must be divisible by optimizerStepsPerBatch",
            ".promptsPerStep",
        ),
        _rule("self.warmupSteps <= self.totalSteps", "must not exceed totalSteps", ".warmupSteps"),
    ],
    ("spec", "rollout"): [
        _rule(
            "self.gpusPerReplica == 0 || self.gpusPerReplica % self.tensorParallelSize == 0",
            "must divide spec.rollout.gpusPerReplica",
            ".tensorParallelSize",
        ),
    ],
    ("spec", "checkpoint"): [
        _rule(
            "has(self.existingClaim) != has(self.size)",
            "set exactly one of spec.checkpoint.existingClaim and spec.checkpoint.size",
        ),
    ],
    ("spec", "mlflow"): [
        _rule(
            "!has(self.bestModelAlias) || has(self.registeredModelName)",
            "needs spec.mlflow.registeredModelName",
            ".bestModelAlias",
        ),
    ],
    ("spec", "rollout", "env"): _env_rules("spec.rollout.env"),
    ("spec", "trainer", "env"): _env_rules("spec.trainer.env"),
    ("spec", "rollout", "env", "items", "valueFrom"): [
        _rule("has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one of secretKeyRef, configMapKeyRef")
    ],
    ("spec", "trainer", "env", "items", "valueFrom"): [
        _rule("has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one of secretKeyRef, configMapKeyRef")
    ],
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the run."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Last completed step."},
    {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps", "description": "Total steps."},
    {"name": "Reward", "type": "number", "jsonPath": ".status.progress.reward", "description": "Last mean reward."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Trainer restarts."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1, "description": "Why."},
    {"name": "MLflow-Run", "type": "string", "jsonPath": ".status.mlflow.runId", "priority": 1},
]


def to_structural(schema: Schema, defs: dict[str, Schema]) -> Schema:
    """Convert one pydantic JSON-Schema node (and its children) into a structural OpenAPI v3 schema."""
    node = copy.deepcopy(schema)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = to_structural(defs[ref.rsplit("/", 1)[-1]], defs)
        target.update({k: v for k, v in node.items() if k != "title"})
        node = target

    any_of = node.get("anyOf")
    if any_of is not None and not node.get("x-kubernetes-int-or-string"):
        variants = [v for v in any_of if v.get("type") != "null"]
        if len(variants) != 1 or len(variants) == len(any_of):
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        del node["anyOf"]
        inner = to_structural(variants[0], defs)
        inner.update({k: v for k, v in node.items() if k not in ("title",)})
        inner["nullable"] = True
        if inner.get("default", 0) is None:
            del inner["default"]
        node = inner

    node.pop("title", None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[bound.replace("exclusiveM", "m")] = node[bound]
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:
        items = node.pop("prefixItems")
        if any(i != items[0] for i in items):
            raise ValueError(f"tuples of mixed types are not structural: {items}")
        node["items"] = items[0]
    if isinstance(node.get("items"), dict):
        node["items"] = to_structural(node["items"], defs)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = to_structural(node["additionalProperties"], defs)
    if "properties" in node:
        node["properties"] = {k: to_structural(v, defs) for k, v in node["properties"].items()}
        node.setdefault("type", "object")
    return node


def _walk(node: Schema, path: tuple[str, ...]) -> Schema:
    for key in path:
        node = node["items"] if key == "items" else node["properties"][key]
    return node


def _default_empty_sections(node: Schema, required: frozenset[str] = frozenset()) -> None:
    """Give every optional, non-nullable section whose fields all have defaults `default: {}`, so the API server
    fills in the whole section and `kubectl get -o yaml` shows the values the run uses."""
    for key, child in node.get("properties", {}).items():
        if child.get("type") == "object" and "properties" in child:
            optional = key not in required and not child.get("nullable") and "default" not in child
            if optional and not child.get("required"):
                child["default"] = {}
            _default_empty_sections(child, frozenset(child.get("required", ())))
        if child.get("type") == "array" and isinstance(child.get("items"), dict):
            _default_empty_sections(child["items"], frozenset(child["items"].get("required", ())))


def _immutability_rules(spec: Schema) -> None:
    """`self == oldSelf` on every spec field outside MUTABLE_PATHS; presence rules for optional ones."""
    mutable_parents = {p[:-1] for p in MUTABLE_PATHS if len(p) > 1}

    def visit(node: Schema, path: tuple[str, ...]) -> None:
        optional = []
        for key, child in node["properties"].items():
            sub = (*path, key)
            if sub in MUTABLE_PATHS:
                continue
            if sub in mutable_parents:
                visit(child, sub)
                continue
            child.setdefault("x-kubernetes-validations", []).append(
                _rule("self == oldSelf", f"spec.{'.'.join(sub)} is immutable; create a new LuffyRun to change it")
            )
            if key not in node.get("required", ()) and "default" not in child:
                optional.append(key)
        for key in optional:
            node.setdefault("x-kubernetes-validations", []).append(
                _rule(
                    f"has(self.{key}) == has(oldSelf.{key})",
                    f"spec.{'.'.join((*path, key))} cannot be added or removed after creation",
                )
            )

    visit(spec, ())


def openapi_schema() -> Schema:
    """The LuffyRun `openAPIV3Schema`."""
    raw = LuffyRun.model_json_schema(by_alias=True)
    defs = raw.pop("$defs")
    schema = to_structural(raw, defs)
    spec = schema["properties"]["spec"]
    for section, keys in REQUIRED_FIELDS.items():
        target = spec["properties"][section]
        target["required"] = sorted(set(target.get("required", [])) | set(keys))
        for key in keys:  # the trainer's default (e.g. the paper's model) must not fill in a required field
            target["properties"][key].pop("default", None)
    _default_empty_sections(spec, frozenset(spec.get("required", ())))
    schema["properties"]["metadata"] = {
        "type": "object",
        "properties": {"name": schema["properties"]["metadata"]["properties"]["name"]},
    }
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    conditions.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    for key in ("apiVersion", "kind"):
        schema["properties"][key].pop("default", None)
    schema["required"] = ["spec"]
    for path, rules in CEL_RULES.items():
        _walk(schema, path).setdefault("x-kubernetes-validations", []).extend(rules)
    _immutability_rules(spec)
    schema["properties"]["status"].pop("nullable", None)
    return schema


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "luffy", "app.kubernetes.io/part-of": "luffy"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    """The CRD as the YAML file committed in crds/."""
    header = f"# Generated by `luffy-operator crd` from luffy_operator/api.py; do not edit. {API_VERSION} {KIND}\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
