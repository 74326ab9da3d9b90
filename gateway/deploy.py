"""Turn an uploaded module and its manifest into an immutable version, without running it."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from typing import Any

import jsonschema
import orjson

from gateway import GatewayError
from gateway.registry import VersionRecord
from sdk.schema import SchemaError, ToolSpec, module_description, tools_from_source

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_SOURCE_BYTES = 512 * 1024
MANIFEST_KEYS = {"name", "description", "env", "functions", "version"}
FUNCTION_KEYS = {"description", "input_schema", "inputSchema", "output_schema", "outputSchema"}
REF_REASON = "schemas must be self-contained (strict clients reject references)"
REGEX_REASON = "regular expressions can take exponential time; check the value in the app"
NAMED_SUBSCHEMAS = {"properties", "$defs", "definitions", "dependentSchemas",
                    "patternProperties"}
SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
SUBSCHEMAS = {"items", "not", "if", "then", "else", "contains", "additionalProperties",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems"}
FORBIDDEN_KEYWORDS = {
    "$ref": REF_REASON, "$dynamicRef": REF_REASON, "$recursiveRef": REF_REASON,
    "pattern": REGEX_REASON, "patternProperties": REGEX_REASON,
}


class DeployError(GatewayError):
    """The upload cannot become a version; the message says what to fix."""


def check_name(name: str) -> str:
    if not NAME.match(name) or name.startswith("app_"):
        raise DeployError(f"invalid app name {name!r}: use 1-63 lowercase letters, digits, '-' "
                          "or '_', starting with a letter or digit (and not 'app_')")
    return name


def build_version(source: str, manifest: dict[str, Any] | None, code_hash: str) -> VersionRecord:
    """Derive every tool's schemas statically and apply the manifest's overrides."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise DeployError(f"the module is larger than {MAX_SOURCE_BYTES} bytes")
    manifest = check_manifest(manifest or {})
    try:
        specs = tools_from_source(source)
        description = module_description(source)
    except SchemaError as exc:
        raise DeployError(str(exc)) from exc
    tools = [tool_entry(spec, manifest.get("functions", {}).get(spec.name, {})) for spec in specs]
    unknown = set(manifest.get("functions", {})) - {spec.name for spec in specs}
    if unknown:
        raise DeployError(f"the manifest describes functions the module does not have: "
                          f"{', '.join(sorted(unknown))}")
    content = source.encode() + b"\0" + orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)
    return VersionRecord(
        app_id="",
        version=hashlib.sha256(content).hexdigest()[:12],
        code_hash=code_hash,
        description=str(manifest.get("description") or description),
        manifest=manifest,
        tools=tools,
        created_at=time.time(),
    )


def tool_entry(spec: ToolSpec, override: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": spec.name,
        "description": override.get("description", spec.description),
        "inputSchema": override.get("inputSchema", override.get("input_schema",
                                                                  spec.input_schema)),
        "outputSchema": override.get("outputSchema", override.get("output_schema",
                                                                    spec.output_schema)),
    }
    if entry["inputSchema"].get("type") != "object":
        raise DeployError(f"the manifest's input schema of {spec.name!r} must have type object")
    output = entry["outputSchema"]
    if output is not None and (not isinstance(output, dict) or output.get("type") != "object"):
        raise DeployError(f"the manifest's output schema of {spec.name!r} must have type object")
    for which in ("inputSchema", "outputSchema"):
        if entry[which] is not None:
            check_schema(entry[which], f"the {which} of {spec.name!r}")
    return entry


def check_schema(schema: dict[str, Any], what: str) -> None:
    """A manifest schema must be valid, self-contained and cheap to evaluate."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise DeployError(f"{what} is not a valid JSON Schema: {exc.message}") from None
    for keyword in _keywords(schema):
        if keyword in FORBIDDEN_KEYWORDS:
            raise DeployError(f"{what} uses {keyword!r}, which is not allowed: "
                              f"{FORBIDDEN_KEYWORDS[keyword]}")


def _keywords(schema: Any) -> set[str]:
    """Every keyword used in a schema and its subschemas (not property names, not data)."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            found.add(key)
            if key in NAMED_SUBSCHEMAS and isinstance(value, dict):
                stack.extend(value.values())
            elif key in SUBSCHEMA_LISTS and isinstance(value, list):
                stack.extend(value)
            elif key in SUBSCHEMAS:
                stack.extend(value if isinstance(value, list) else [value])
    return found


def check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise DeployError("the manifest must be a JSON object")
    unknown = set(manifest) - MANIFEST_KEYS
    if unknown:
        raise DeployError(f"unknown manifest keys: {', '.join(sorted(unknown))}; expected some "
                          f"of {', '.join(sorted(MANIFEST_KEYS))}")
    if "description" in manifest and not isinstance(manifest["description"], str):
        raise DeployError("the manifest's description must be a string")
    functions = manifest.get("functions", {})
    if not isinstance(functions, dict):
        raise DeployError("the manifest's functions must be an object keyed by function name")
    for name, entry in functions.items():
        if not isinstance(entry, dict) or set(entry) - FUNCTION_KEYS:
            raise DeployError(f"the manifest entry for {name!r} may only have "
                              f"{', '.join(sorted(FUNCTION_KEYS))}")
        for key in FUNCTION_KEYS - {"description"}:
            if key in entry and not isinstance(entry[key], dict):
                raise DeployError(f"the manifest's {key} of {name!r} must be a JSON object")
        if "description" in entry and not isinstance(entry["description"], str):
            raise DeployError(f"the manifest's description of {name!r} must be a string")
    env = manifest.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, dict) for v in env.values()):
        raise DeployError("the manifest's env must map variable names to objects")
    return manifest


def version_summary(record: VersionRecord, live: str | None) -> dict[str, Any]:
    return {
        "version": record.version,
        "live": record.version == live,
        "created_at": record.created_at,
        "tools": [t["name"] for t in record.tools],
        "description": record.description,
    }


def with_app(record: VersionRecord, app_id: str) -> VersionRecord:
    return dataclasses.replace(record, app_id=app_id)
