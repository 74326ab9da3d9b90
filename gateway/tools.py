"""Tool-call arguments in, MCP tool results out: decoding, validation and result shaping."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import referencing
import orjson

from gateway import GatewayError
from workers.jobs import CallReply


class ArgumentError(GatewayError):
    """The arguments do not fit the tool's input schema."""


@functools.lru_cache(maxsize=4096)
def _validator(schema_json: bytes) -> jsonschema.protocols.Validator:
    schema = orjson.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    # An empty registry: a $ref can never make the gateway fetch a URL or read a file.
    return cls(schema, registry=referencing.Registry())


def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A compiled validator, cached by the schema's canonical JSON (versions are immutable)."""
    return _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))


def _allows(schema: dict[str, Any], kind: str) -> bool:
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared == kind
    if isinstance(declared, list):
        return kind in declared
    return any(_allows(s, kind) for s in schema.get("anyOf", []) if isinstance(s, dict))


def prepare_arguments(tool: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """Decode JSON-string objects and lists, drop nulls meaning "not given", then validate."""
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ArgumentError("arguments must be a JSON object")
    schema = tool["inputSchema"]
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    prepared: dict[str, Any] = {}
    for name, value in arguments.items():
        prop = properties.get(name)
        if isinstance(prop, dict):
            value = _decode_if_string(prop, value)
            if value is None and name not in required and not _allows(prop, "null"):
                continue
        prepared[name] = value
    errors = sorted(validator(schema).iter_errors(prepared), key=lambda e: list(e.path))
    if errors:
        raise ArgumentError("; ".join(_describe(e) for e in errors[:5]))
    return prepared


def _decode_if_string(prop: dict[str, Any], value: Any) -> Any:
    """Some clients send an object or list argument as a JSON string: accept it decoded."""
    if not isinstance(value, str) or _allows(prop, "string"):
        return value
    wants_object, wants_array = _allows(prop, "object"), _allows(prop, "array")
    if not (wants_object or wants_array):
        return value
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    if (wants_object and isinstance(decoded, dict)) or (wants_array and isinstance(decoded, list)):
        return decoded
    return value


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown argument")
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    return f"{where}: {error.message}" if where else error.message


def tool_result(tool: dict[str, Any], reply: CallReply, with_logs: bool) -> dict[str, Any]:
    """The MCP CallToolResult for a worker's reply."""
    if not reply.ok:
        result = error_result(reply.error or reply.outcome)
    else:
        result = _success(tool, reply.value)
    meta = {"ultralight/outcome": reply.outcome,
            "ultralight/elapsed_ms": round(reply.elapsed_ms, 2)}
    if with_logs and reply.logs:
        meta["ultralight/logs"] = reply.logs
    result["_meta"] = meta
    return result


def _success(tool: dict[str, Any], value: Any) -> dict[str, Any]:
    structured = value if isinstance(value, dict) else {"result": value}
    schema = tool.get("outputSchema")
    if schema is not None:
        problem = next(iter(validator(schema).iter_errors(structured)), None)
        if problem is not None:
            return error_result(f"the tool returned a value that does not match its declared "
                                f"return type: {problem.message}")
    text = orjson.dumps(value).decode()
    return {"content": [{"type": "text", "text": text}], "structuredContent": structured,
            "isError": False}


def error_result(message: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": message}], "isError": True}
