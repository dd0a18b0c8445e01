"""The generated CRD: in sync with the models, a valid structural schema, and it admits and rejects what it should."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from crd_validation import CrdValidator
from luffy_operator.api import MANAGED_ROLLOUT_FLAGS, MUTABLE_PATHS, SpecError, check_name, dump_spec, parse_spec
from luffy_operator.crd import render
from luffyrun_samples import INVALID_CASES, invalid_run, names_field, valid_run
from operator_harness import CRD_PATH, REPO

EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("luffyrun-*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> CrdValidator:
    return CrdValidator(crd)


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_file_matches_the_models() -> None:
    assert CRD_PATH.read_text() == render(), "crds/ drifted from luffy_operator/api.py: run `make crd`"


def test_crd_is_a_valid_customresourcedefinition(crd: dict[str, Any]) -> None:
    for version in ("1.30", "1.32", "1.35"):
        kubernetes_validate.validate(crd, version, strict=True)
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("LuffyRun", "luffyruns", ["lr"])
    assert "luffy" in names["categories"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        out += _nodes(child, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        out += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural_and_explained(crd: dict[str, Any]) -> None:
    """Every node has a type (or is int-or-string), no refs or unions, and every field a description."""
    for path, node in _nodes(schema_of(crd)):
        assert not {"$ref", "oneOf", "allOf", "not", "$defs", "title", "const"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("exclusiveMinimum"), float), path
        is_field = path and not path.endswith(("[]", "}"))
        if is_field and path.startswith(("spec", "status")):
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_printer_columns_read_named_fields(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0] == [
        "Phase",
        "Step",
        "Total",
        "Reward",
        "Restarts",
        "Age",
    ]
    schema = schema_of(crd)
    for column in columns.values():
        assert "[" not in column["jsonPath"], f"{column['name']} must not read a list element"
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part] if part != "creationTimestamp" else {"type": "string"}
        assert node["type"] == {"date": "string"}.get(column["type"], column["type"]), column["name"]


def test_valid_run_passes_schema_and_rules(validator: CrdValidator) -> None:
    assert validator.errors(valid_run()) == []


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_pass_schema_rules_and_models(validator: CrdValidator, example: str) -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / example).read_text()) if d]
    runs = [d for d in docs if d["kind"] == "LuffyRun"]
    assert len(runs) == 1
    assert validator.errors(runs[0]) == []
    parse_spec(runs[0]["spec"])
    for other in docs:
        if other["kind"] != "LuffyRun":
            kubernetes_validate.validate(other, "1.32", strict=True)


def test_schema_defaults_are_the_models_defaults(validator: CrdValidator) -> None:
    """What the API server fills in equals what the operator assumes for an omitted field."""
    run = valid_run(mlflow={"trackingUri": "http://mlflow:5000"})
    defaulted = validator.defaulted(run)["spec"]
    model = dump_spec(parse_spec(run["spec"]))

    def compact(value: Any) -> Any:
        """None and empty collections mean the same as an absent field."""
        if isinstance(value, dict):
            value = {k: compact(v) for k, v in value.items()}
            return {k: v for k, v in value.items() if v is not None and v != {} and v != []}
        return value

    assert compact(defaulted) == compact(model)


def operator_refusal(obj: dict[str, Any]) -> str | None:
    """What the operator says of a run where no API server enforced the CRD: its SpecError, or None if accepted."""
    try:
        check_name(obj["metadata"]["name"])
        parse_spec(obj["spec"])
    except SpecError as err:
        return str(err)
    return None


@pytest.mark.parametrize("case_id,field", [(c[0], c[2]) for c in INVALID_CASES])
def test_invalid_runs_are_refused_by_both_layers_naming_the_field(
    validator: CrdValidator, case_id: str, field: str
) -> None:
    run = invalid_run(case_id)
    problems = validator.errors(run)
    assert problems, f"{case_id} was admitted by the CRD"
    assert any(names_field(p, field) for p in problems), ("CRD", field, problems)
    refusal = operator_refusal(run)
    assert refusal is not None, f"{case_id} was accepted by the operator"
    assert names_field(refusal, field), ("operator", field, refusal)


def test_enough_invalid_cases() -> None:
    assert len(INVALID_CASES) >= 80
    assert len({c[0] for c in INVALID_CASES}) == len(INVALID_CASES)


def _updated(run: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    new = copy.deepcopy(run)
    node = new["spec"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return new


@pytest.mark.parametrize(
    "path,value",
    [
        (("suspend",), True),
        (("rollout", "replicas"), 4),
        (("failurePolicy",), {"maxRestarts": 7}),
        (("cleanup",), {"onSuccess": "Delete"}),
    ],
)
def test_mutable_fields_may_change(validator: CrdValidator, path: tuple[str, ...], value: Any) -> None:
    assert path[:1] in {p[:1] for p in MUTABLE_PATHS}
    old = valid_run()
    assert validator.errors(_updated(old, path, value), old=old) == []


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("model", "path"), "/other/model", "spec.model"),
        (("rollout", "temperature"), 0.7, "spec.rollout.temperature"),
        (("trainer", "nodes"), 2, "spec.trainer"),
        (("algorithm", "gamma"), 0.5, "spec.algorithm"),
        (("image",), "luffy:0.2.0", "spec.image"),
        (("mlflow",), {"trackingUri": "http://mlflow:5000"}, "spec.mlflow"),
    ],
)
def test_immutable_fields_are_refused_on_update(
    validator: CrdValidator, path: tuple[str, ...], value: Any, field: str
) -> None:
    old = valid_run(checkpoint={"existingClaim": "shared-rwx"})
    problems = validator.errors(_updated(old, path, value), old=old)
    assert any(field in p and ("immutable" in p or "added or removed" in p) for p in problems), problems


def test_every_spec_value_is_bounded(crd: dict[str, Any]) -> None:
    """int64 at least on every integer; a length on every string, list and map (CEL's cost estimate needs them)."""
    for path, node in _nodes(schema_of(crd)):
        if not path.startswith("spec") or node.get("x-kubernetes-int-or-string"):
            continue
        kind = node.get("type")
        if kind == "integer":
            assert node["minimum"] >= -(2**63) and node["maximum"] <= 2**63 - 1, path
        if kind == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if kind == "array":
            assert "maxItems" in node, path
        if kind == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


@pytest.mark.parametrize(
    "run",
    [
        valid_run(rollout={"replicas": 1, "gpusPerReplica": 4, "tensorParallelSize": 2}),
        valid_run(trainer={"resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}, "limits": {"cpu": 2}}}),
        valid_run(scheduling={"nodeSelector": {"kubernetes.io/os": "linux"}, "queueName": "team-a.gpu"}),
        valid_run(dataVolume={"claimName": "d", "mountPath": "/datasets/math"}),
        valid_run(
            mlflow={"trackingUri": "https://[fd00::1]:8443/mlflow", "bestModelAlias": "b", "registeredModelName": "m"}
        ),
        valid_run(image="registry.example.com:5000/team/luffy:0.1.0@sha256:" + "a" * 64),
    ],
)
def test_near_misses_are_admitted_by_both_layers(validator: CrdValidator, run: dict[str, Any]) -> None:
    """The rules refuse what they should and no more: a neighbour of each refused case passes both layers."""
    assert validator.errors(run) == []
    parse_spec(run["spec"])


def test_managed_rollout_flags_cover_what_serve_rollout_reserves() -> None:
    from luffy_trainer.rollout.serve import RESERVED_VLLM_ARGS

    assert {a.removeprefix("--") for a in RESERVED_VLLM_ARGS} <= set(MANAGED_ROLLOUT_FLAGS)


def test_every_cel_rule_compiles(crd: dict[str, Any]) -> None:
    """Also the rules no corpus case reaches; a fieldPath must name a field of the node it sits on."""
    env = celpy.Environment()
    for path, node in _nodes(schema_of(crd)):
        for rule in node.get("x-kubernetes-validations", []):
            env.compile(rule["rule"])
            if "fieldPath" in rule:
                target = node
                for key in rule["fieldPath"].strip(".").split("."):
                    target = target["properties"][key]
                assert target, (path, rule)
