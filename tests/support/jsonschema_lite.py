"""A JSON Schema validator for the subset xenblockctl's shipped schemas use (xenblockctl/schemas/).

jsonschema is not a dependency of the package or its test extra; the schemas use only type,
properties, required, additionalProperties, items, enum, const, pattern, minimum, maximum and
anyOf, and this checks exactly those. A keyword it does not know is an error, never skipped:
a schema that grows a keyword must grow a check here too."""

from __future__ import annotations

import re
from typing import Any

_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_KNOWN = _ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "pattern",
    "minimum",
    "maximum",
    "anyOf",
}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
#: golden files replace per-run values by `<name>`: with wildcards=True those match any schema
_PLACEHOLDER = re.compile(r"<[a-z_: ]+>")


def errors(schema: dict[str, Any], value: Any, *, wildcards: bool = False, where: str = "$") -> list[str]:
    """Every way `value` fails `schema`, as `path: reason` lines (empty: valid)."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"{where}: schema keywords not supported by this validator: {sorted(unknown)}")
    if wildcards and isinstance(value, str) and _PLACEHOLDER.fullmatch(value):
        return []
    found: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: {type(value).__name__} {value!r:.60} is not {' or '.join(types)}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: {value!r:.60} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r:.60} is not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        found.append(f"{where}: {value!r:.60} does not match {schema['pattern']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        found.append(f"{where}: {value} < {schema['minimum']}")
    if "maximum" in schema and _TYPES["number"](value) and value > schema["maximum"]:
        found.append(f"{where}: {value} > {schema['maximum']}")
    if "anyOf" in schema:
        branches = [errors(s, value, wildcards=wildcards, where=where) for s in schema["anyOf"]]
        if all(branches):
            found.append(f"{where}: matches no anyOf branch ({'; '.join(b[0] for b in branches)})")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        found += [f"{where}: missing key {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                found += errors(props[key], item, wildcards=wildcards, where=f"{where}.{key}")
            elif extra is False:
                found.append(f"{where}: key {key!r} is not in the schema")
            elif isinstance(extra, dict):
                found += errors(extra, item, wildcards=wildcards, where=f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(schema["items"], item, wildcards=wildcards, where=f"{where}[{i}]")
    return found
