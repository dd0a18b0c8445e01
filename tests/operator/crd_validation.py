"""What an API server does with a LuffyRun before storing it, as far as it can be done here: structural defaulting,
OpenAPI schema validation (jsonschema, with kubectl's strict rejection of unknown fields) and the CEL rules
(x-kubernetes-validations, evaluated with cel-python, transition rules against the old object).

Of the Kubernetes-specific CEL libraries only `quantity(...).compareTo(...)` is emulated, with the operator's own
quantity parser (so it checks the rules' logic, not a second parser). Not emulated: CEL cost limits, the other
Kubernetes CEL libraries, server-side name validation beyond the schema.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import celpy
import jsonschema
from luffy_operator.fields import quantity_value

Schema = dict[str, Any]


def _strict_jsonschema(node: Schema, path: tuple[str, ...] = ()) -> Schema:
    """OpenAPI v3 (k8s flavour) to draft-4 JSON Schema: `nullable` becomes a null type, unknown fields are errors."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: _strict_jsonschema(v, (*path, k)) for k, v in node["properties"].items()}
        if path != ("metadata",):
            out["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        out["items"] = _strict_jsonschema(node["items"], (*path, "items"))
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict_jsonschema(node["additionalProperties"], (*path, "*"))
    return out


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting: a missing property with a `default` gets it, top-down, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Schema) -> Any:
    """`pattern` as the API server's Go regexp reads it: `$` is the end of the text, where Python's `$` also matches
    before a final newline (so "luffy:0.1\\n" would pass here and fail there)."""
    if validator.is_type(instance, "string") and not re.search(re.sub(r"\$$", r"\\Z", pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Draft4Re2 = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


class CrdValidator:
    """Validates LuffyRun objects against the CRD's openAPIV3Schema and CEL rules."""

    def __init__(self, crd: dict[str, Any]) -> None:
        self.schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        self.validator = _Draft4Re2(_strict_jsonschema(self.schema))
        self.cel = celpy.Environment()
        self._programs: dict[str, Any] = {}
        self._functions = {
            "quantity": lambda text: celpy.celtypes.StringType(text),
            "compareTo": lambda a, b: celpy.celtypes.IntType(
                (quantity_value(str(a)) > quantity_value(str(b))) - (quantity_value(str(a)) < quantity_value(str(b)))
            ),
        }

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        return apply_defaults(self.schema, copy.deepcopy(obj))

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        """One `path: problem` line per schema error, then `path: message` of every failing CEL rule (the path of the
        node the rule sits on, plus its fieldPath, as the API server reports it)."""
        new = self.defaulted(obj)
        problems = [self._describe(e) for e in self.validator.iter_errors(new)]
        if problems:
            return problems  # like the API server: CEL runs only on schema-valid objects
        return self._cel_failures(self.schema, new, None if old is None else self.defaulted(old), "")

    @staticmethod
    def _describe(error: jsonschema.ValidationError) -> str:
        path = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            missing = error.message.split("'")[1]
            path = f"{path}.{missing}" if path else missing
        elif error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            return f"{path}.{extra[0]}: unknown field"
        return f"{path}: {error.message}"

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self.cel.program(self.cel.compile(rule), functions=self._functions)
        return self._programs[rule]

    def _cel_failures(self, schema: Schema, new: Any, old: Any, path: str) -> list[str]:
        failures = []
        for rule in schema.get("x-kubernetes-validations", []):
            transition = "oldSelf" in rule["rule"]
            if transition and old is None:
                continue
            activation = {"self": celpy.json_to_cel(new)}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(old)
            result = self._program(rule["rule"]).evaluate(activation)
            if isinstance(result, celpy.CELEvalError):
                raise AssertionError(f"CEL rule {rule['rule']!r} did not evaluate: {result}")
            if not result:
                failures.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
        if isinstance(new, dict) and "properties" in schema:
            for key, sub in schema["properties"].items():
                if key in new and new[key] is not None:
                    previous = old.get(key) if isinstance(old, dict) else None
                    failures += self._cel_failures(sub, new[key], previous, f"{path}.{key}" if path else key)
        elif isinstance(new, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(new):  # list items are not correlated with the old list (atomic lists)
                failures += self._cel_failures(schema["items"], item, None, f"{path}[{i}]")
        return failures
