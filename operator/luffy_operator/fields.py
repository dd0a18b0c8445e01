"""Value types of the LuffyRun API as Kubernetes defines them, each declared once for both validation layers.

Each type is an `Annotated` declaration: its pattern, length and bounds become both the pydantic check (what the
operator applies where no API server enforces the CRD) and the CRD's OpenAPI schema; what a schema cannot say (map
keys, quantity comparisons) is a `Cel` rule next to the Python check that restates it. Values the operator itself
owns (env names, mount paths, managed flags) are declared the same way in `api.py`, next to what they protect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from luffy_trainer.config import INT64_MAX
from pydantic import AfterValidator, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue, WithJsonSchema
from pydantic_core import CoreSchema


@dataclass(frozen=True)
class Cel:
    """A CEL rule (`x-kubernetes-validations`) the CRD carries on the schema node of the annotated type or model."""

    rule: str
    message: str
    field_path: str | None = None  # where the API server reports a failure, relative to the node: ".operator"

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        schema.setdefault("x-kubernetes-validations", []).append(self.as_schema_extra())
        return schema

    def as_schema_extra(self) -> dict[str, Any]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def cel_rules(*rules: Cel) -> dict[str, Any]:
    """`json_schema_extra` putting model-level rules (cross-field checks of one model) on the model's schema node."""
    return {"x-kubernetes-validations": [r.as_schema_extra() for r in rules]}


def _checked(pattern: str, what: str) -> AfterValidator:
    """A Python check of `pattern` for map keys: as a pydantic `pattern` it would become `propertyNames`, which a
    structural schema may not have (the CEL twin is `qualified_keys`)."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


# --- names ------------------------------------------------------------------------------------------------------------

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A qualified name (label key, annotation key, resource name): an optional DNS-subdomain prefix and `/`, then a name
# of at most 63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"

K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
QueueName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_SUBDOMAIN)]
QualifiedName = Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
ConfigKey = Annotated[str, Field(min_length=1, max_length=253, pattern=CONFIG_KEY)]
EnvName = Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME)]
MapKey = Annotated[str, _checked(QUALIFIED_NAME, "a qualified name (e.g. cpu, nvidia.com/gpu, kubernetes.io/os)")]


def qualified_keys(what: str) -> Cel:
    """The CEL twin of `MapKey`: a schema cannot constrain the keys of a map."""
    return Cel(f"self.all(k, k.matches({QUALIFIED_NAME!r}))", f"every {what} must be a qualified name")


LabelMap = Annotated[dict[MapKey, LabelValue], Field(max_length=64), qualified_keys("node-selector key (a label key)")]


# --- images and URLs --------------------------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN = r"([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]+)?"
# An image reference as the distribution grammar defines it: [registry[:port]/]path[:tag][@algorithm:digest].
IMAGE_REFERENCE = (
    rf"^({_DOMAIN}/)?{_COMPONENT}(/{_COMPONENT})*(:[A-Za-z0-9_][-.A-Za-z0-9_]{{0,127}})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
ImageReference = Annotated[str, Field(min_length=1, max_length=512, pattern=IMAGE_REFERENCE)]

_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_HOST = (
    r"([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
)
# An http(s) base URL: a host (DNS name, IPv4 or [IPv6]), an optional port 1-65535 and path; no user info (it would
# land in the ConfigMap), query, fragment or whitespace.
HTTP_URL = rf"^https?://{_HOST}(:{_PORT})?(/[^\s?#@]*)?$"
HttpUrl = Annotated[str, Field(min_length=1, max_length=2048, pattern=HTTP_URL)]


# --- quantities -------------------------------------------------------------------------------------------------------

# A non-negative Kubernetes quantity (a sign is refused: no resource, size or limit is negative).
QUANTITY = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_SUFFIXES = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(10) ** e for s, e in (("n", -9), ("u", -6), ("m", -3), ("k", 3), ("M", 6), ("G", 9), ("T", 12))},
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "": Decimal(1),
}


def quantity_value(value: int | str) -> Decimal:
    """The amount a quantity stands for (`1Gi` -> 1073741824), for comparing requests with limits."""
    text = str(value)
    if not re.fullmatch(QUANTITY, text):
        raise ValueError(f"{value!r} is not a non-negative Kubernetes quantity (e.g. 8Gi, 500m, 2)")
    number = re.match(r"^[0-9.]+([eE][-+]?[0-9.]+)?", text)
    assert number is not None
    return Decimal(number.group(0)) * _SUFFIXES[text[number.end() :]]


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int) and value > INT64_MAX:
        raise ValueError(f"{value} is beyond int64")
    quantity_value(value)
    return value


# An integer or a string such as "8Gi"; the CRD marks it int-or-string.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "minimum": 0,
            "maximum": INT64_MAX,
            "maxLength": 64,
        }
    ),
]
ResourceMap = Annotated[dict[MapKey, Quantity], Field(max_length=16), qualified_keys("resource name")]


def requests_within_limits(requests: dict[str, int | str], limits: dict[str, int | str]) -> None:
    """Raise ValueError naming the first resource whose request exceeds its limit."""
    for name, request in requests.items():
        if name in limits and quantity_value(request) > quantity_value(limits[name]):
            raise ValueError(f"requests.{name} ({request}) exceeds limits.{name} ({limits[name]})")


REQUESTS_WITHIN_LIMITS = Cel(
    "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) "
    "|| quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
    "every request must be at most its limit",
)
