"""Tool specs for an app module, derived from its source with ``ast`` and never by running it.

Every public top-level function becomes a tool; its type hints become inline JSON Schemas (no
``$ref``) that stay simple enough for strict MCP clients.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sdk import SdkError

Schema = dict[str, Any]
_Function = ast.FunctionDef | ast.AsyncFunctionDef

_SUGGESTION = (
    "use str, int, float, bool, None, Literal, list[...], dict[str, ...], "
    "a TypedDict or a dataclass"
)
_NULL: Schema = {"type": "null"}
_NO_DEFAULT = object()

_SCALARS = {
    "builtins.str": "string",
    "builtins.int": "integer",
    "builtins.float": "number",
    "builtins.bool": "boolean",
}
_ANY = {"typing.Any", "builtins.object"}
_LISTS = {
    "builtins.list",
    "typing.List",
    "typing.Sequence",
    "typing.MutableSequence",
    "collections.abc.Sequence",
    "collections.abc.MutableSequence",
}
_TUPLES = {"builtins.tuple", "typing.Tuple"}
_DICTS = {
    "builtins.dict",
    "typing.Dict",
    "typing.Mapping",
    "typing.MutableMapping",
    "collections.abc.Mapping",
    "collections.abc.MutableMapping",
}
_SKIPPED_FIELDS = {"typing.ClassVar", "dataclasses.KW_ONLY"}

_ARGS_HEADER = re.compile(r"(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):")
_ARGS_ENTRY = re.compile(r"\*{0,2}(\w+)\s*(?:\(.*?\))?\s*:\s*(.*)")


class SchemaError(SdkError):
    """The module cannot become tools; str(exc) says why, names the line, and can be acted on."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, description and the JSON Schemas of its arguments and result."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    wraps_result: bool
    is_async: bool
    line: int


def tools_from_source(source: str, filename: str = "app.py") -> list[ToolSpec]:
    """The tools an app module defines, in source order; SchemaError when it cannot have any."""
    tree = _parse(source, filename)
    functions = _public_functions(tree)
    if not functions:
        raise SchemaError(
            f"{filename} defines no public function; a tool is a top-level def whose name "
            "does not start with '_'"
        )

    hints = _Hints(_Module(tree))
    return [_tool(function, hints) for function in functions]


def module_description(source: str) -> str:
    """The module docstring, cleaned of indentation; "" when there is none."""
    return ast.get_docstring(_parse(source, "app.py")) or ""


def _parse(source: str, filename: str) -> ast.Module:
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise SchemaError(f"syntax error: {exc.msg}", exc.lineno) from exc
    except ValueError as exc:  # null bytes are a ValueError before Python 3.12
        raise SchemaError(f"cannot parse {filename}: {exc}") from exc


def _public_functions(tree: ast.Module) -> list[_Function]:
    # A later def of the same name replaces the earlier one when the module runs.
    latest: dict[str, _Function] = {}
    for stmt in tree.body:
        if isinstance(stmt, _Function) and not stmt.name.startswith("_"):
            latest[stmt.name] = stmt
    return sorted(latest.values(), key=lambda function: function.lineno)


def _tool(function: _Function, hints: _Hints) -> ToolSpec:
    description, arg_docs = _split_args_section(ast.get_docstring(function) or "")
    output_schema, wraps_result = _output_schema(function, hints)
    return ToolSpec(
        name=function.name,
        description=description,
        input_schema=_input_schema(function, hints, arg_docs),
        output_schema=output_schema,
        wraps_result=wraps_result,
        is_async=isinstance(function, ast.AsyncFunctionDef),
        line=function.lineno,
    )


def _input_schema(function: _Function, hints: _Hints, arg_docs: dict[str, str]) -> Schema:
    _reject_unnamed_parameters(function)
    args = function.args
    padding: list[ast.expr | None] = [None] * (len(args.args) - len(args.defaults))
    pairs = [
        *zip(args.args, [*padding, *args.defaults], strict=True),
        *zip(args.kwonlyargs, args.kw_defaults, strict=True),
    ]

    properties: dict[str, Schema] = {}
    required: list[str] = []
    for arg, default in pairs:
        what = f"parameter '{arg.arg}' of '{function.name}'"
        schema, is_required = hints.field(arg.annotation, default, what)
        if arg.arg in arg_docs:
            schema = {**schema, "description": arg_docs[arg.arg]}
        properties[arg.arg] = schema
        if is_required:
            required.append(arg.arg)

    return _object_schema(properties, required)


def _reject_unnamed_parameters(function: _Function) -> None:
    args = function.args
    why = "arguments arrive as keyword arguments, so every parameter needs a name"
    if args.posonlyargs:
        arg = args.posonlyargs[0]
        raise SchemaError(
            f"parameter '{arg.arg}' of '{function.name}' is positional-only; {why} "
            "(remove the '/')",
            arg.lineno,
        )
    for star, arg in (("*", args.vararg), ("**", args.kwarg)):
        if arg is not None:
            raise SchemaError(
                f"'{function.name}' takes {star}{arg.arg}; {why} (list each one explicitly)",
                arg.lineno,
            )


def _output_schema(function: _Function, hints: _Hints) -> tuple[Schema | None, bool]:
    if function.returns is None:
        return None, False

    schema = hints.schema(function.returns, f"return type of '{function.name}'")
    if schema.get("type") == "object":
        return schema, False
    if schema == _NULL or _may_be_object(schema):
        return None, False
    # MCP's structuredContent must be an object, so other values travel as {"result": value}.
    return {"type": "object", "properties": {"result": schema}, "required": ["result"]}, True


def _object_schema(properties: dict[str, Schema], required: list[str]) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


class _Module:
    """What the module's top-level names are bound to: imports, type aliases and classes."""

    def __init__(self, tree: ast.Module) -> None:
        self.imports: dict[str, str] = {}
        self.aliases: dict[str, ast.expr] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for stmt in tree.body:
            self._bind(stmt)

    def qualname(self, node: ast.expr) -> str | None:
        """The dotted name a hint refers to ("typing.Optional", "builtins.int"), if any."""
        if isinstance(node, ast.Name):
            if node.id in self.aliases or node.id in self.classes:
                return None
            dotted = self.imports.get(node.id, f"builtins.{node.id}")
        elif isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            if base is None:
                return None
            dotted = f"{base}.{node.attr}"
        else:
            return None
        return re.sub(r"^typing_extensions\.", "typing.", dotted)

    def _bind(self, stmt: ast.stmt) -> None:
        type_alias = getattr(ast, "TypeAlias", None)  # the `type X = ...` statement, Python 3.12+
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                self._set(local, imported=alias.name if alias.asname else local)
        elif isinstance(stmt, ast.ImportFrom):
            module = "." * stmt.level + (stmt.module or "")
            for alias in stmt.names:
                self._set(alias.asname or alias.name, imported=f"{module}.{alias.name}")
        elif isinstance(stmt, ast.Assign) and _single_name(stmt.targets):
            self._set(_single_name(stmt.targets), alias=stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            is_alias = self.qualname(stmt.annotation) == "typing.TypeAlias"
            self._set(stmt.target.id, alias=stmt.value if is_alias else None)
        elif type_alias is not None and isinstance(stmt, type_alias):
            self._set(stmt.name.id, alias=stmt.value)
        elif isinstance(stmt, ast.ClassDef):
            self._set(stmt.name, cls=stmt)
        elif isinstance(stmt, _Function):
            self._set(stmt.name)

    def _set(
        self,
        name: str,
        imported: str | None = None,
        alias: ast.expr | None = None,
        cls: ast.ClassDef | None = None,
    ) -> None:
        # The last binding of a name wins, as it does when the module runs.
        for table in (self.imports, self.aliases, self.classes):
            table.pop(name, None)
        if imported is not None:
            self.imports[name] = imported
        if alias is not None:
            self.aliases[name] = alias
        if cls is not None:
            self.classes[name] = cls


def _single_name(targets: list[ast.expr]) -> str:
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        return targets[0].id
    return ""


class _Hints:
    """Turns type-hint expressions into inline JSON Schemas."""

    def __init__(self, module: _Module) -> None:
        self._module = module
        self._expanding: list[str] = []

    def schema(self, node: ast.expr, what: str) -> Schema:
        """The schema of a hint; `what` names its place ("parameter 'x' of 'f'") in errors."""
        return _union(self._member_schemas(node, what))

    def field(
        self, annotation: ast.expr | None, default: ast.expr | None, what: str
    ) -> tuple[Schema, bool]:
        """The schema of a parameter or dataclass field, and whether it is required."""
        schema = {} if annotation is None else self.schema(annotation, what)
        if default is None:
            return schema, True

        value = _json_default(default)
        if value is None:
            # Leaving the argument out already means None, so strict clients need no null.
            schema = _without_null(schema)
            return ({**schema, "default": None} if _accepts_null(schema) else schema), False
        if value is _NO_DEFAULT:
            return schema, False
        return {**schema, "default": value}, False

    def _member_schemas(self, node: ast.expr, what: str) -> list[Schema]:
        """The schemas of a hint's union members, with nested unions and aliases flattened."""
        node = _unquote(node, what)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._member_schemas(node.left, what) + self._member_schemas(node.right, what)
        if isinstance(node, ast.Name) and node.id in self._module.aliases:
            # The alias stays on the stack until its schema is built, so `A = list[A]` is caught.
            with self._entering(node.id, node):
                return self._member_schemas(self._module.aliases[node.id], what)
        if isinstance(node, ast.Subscript):
            kind = self._module.qualname(node.value)
            args = _subscript_args(node)
            if kind == "typing.Optional" and len(args) == 1:
                return [*self._member_schemas(args[0], what), dict(_NULL)]
            if kind == "typing.Union":
                return [schema for arg in args for schema in self._member_schemas(arg, what)]
            if kind == "typing.Annotated" and args:
                return self._member_schemas(args[0], what)
        return [self._single(node, what)]

    def _single(self, node: ast.expr, what: str) -> Schema:
        """The schema of a hint that is not a union."""
        if isinstance(node, ast.Constant) and node.value is None:
            return dict(_NULL)
        if isinstance(node, ast.Name) and node.id in self._module.classes:
            with self._entering(node.id, node):
                return self._class(self._module.classes[node.id], node, what)
        if isinstance(node, ast.Subscript):
            return self._generic(node, what)

        kind = self._module.qualname(node)
        if kind in _SCALARS:
            return {"type": _SCALARS[kind]}
        if kind in _ANY:
            return {}
        if kind in _LISTS or kind in _TUPLES:
            return {"type": "array"}
        if kind in _DICTS:
            return {"type": "object"}
        raise _unsupported(node, what)

    def _generic(self, node: ast.Subscript, what: str) -> Schema:
        kind = self._module.qualname(node.value)
        args = _subscript_args(node)
        if kind == "typing.Literal" and args:
            return _enum(self._literal_values(node, what))
        if kind in _LISTS and len(args) == 1:
            return _array(self.schema(args[0], what))
        if kind in _TUPLES and args:
            return self._tuple(node, args, what)
        if kind in _DICTS and len(args) == 2:
            return self._mapping(node, args, what)
        raise _unsupported(node, what)

    def _tuple(self, node: ast.Subscript, args: list[ast.expr], what: str) -> Schema:
        ellipses = [isinstance(arg, ast.Constant) and arg.value is Ellipsis for arg in args]
        if ellipses == [False, True]:
            return _array(self.schema(args[0], what))
        if any(ellipses):
            raise _unsupported(node, what)
        items = [self.schema(arg, what) for arg in args]
        size = len(items)
        return {"type": "array", "prefixItems": items, "minItems": size, "maxItems": size}

    def _mapping(self, node: ast.Subscript, args: list[ast.expr], what: str) -> Schema:
        if self.schema(args[0], what) != {"type": "string"}:
            raise SchemaError(
                f"dict keys must be str (JSON object keys are strings), not "
                f"'{ast.unparse(args[0])}', in '{ast.unparse(node)}' for {what}",
                node.lineno,
            )
        values = self.schema(args[1], what)
        return {"type": "object", "additionalProperties": values} if values else {"type": "object"}

    def _literal_values(self, node: ast.Subscript, what: str) -> list[Any]:
        values: list[Any] = []
        for arg in _subscript_args(node):
            if isinstance(arg, ast.Subscript) and self._is_literal(arg):
                values.extend(self._literal_values(arg, what))
                continue
            try:
                value = ast.literal_eval(arg)
            except (ValueError, TypeError, SyntaxError) as exc:
                raise _unsupported(node, what) from exc
            if value is not None and not isinstance(value, (str, int)):
                raise _unsupported(node, what)
            values.append(value)
        return values

    def _is_literal(self, node: ast.Subscript) -> bool:
        return self._module.qualname(node.value) == "typing.Literal"

    def _class(self, cls: ast.ClassDef, ref: ast.expr, what: str) -> Schema:
        if self._is_typed_dict(cls, set()):
            fields = self._typed_dict_fields(cls)
        elif self._is_dataclass(cls):
            fields = self._dataclass_fields(cls)
        else:
            raise _unsupported(ref, what)
        properties = {name: schema for name, (schema, _) in fields.items()}
        required = [name for name, (_, is_required) in fields.items() if is_required]
        return _object_schema(properties, required)

    def _is_typed_dict(self, cls: ast.ClassDef, seen: set[str]) -> bool:
        seen.add(cls.name)
        for base in cls.bases:
            if self._module.qualname(base) == "typing.TypedDict":
                return True
            parent = self._local_base(base)
            if parent is not None and parent.name not in seen and self._is_typed_dict(parent, seen):
                return True
        return False

    def _is_dataclass(self, cls: ast.ClassDef) -> bool:
        for decorator in cls.decorator_list:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            if self._module.qualname(target) == "dataclasses.dataclass":
                return True
        return False

    def _local_base(self, base: ast.expr) -> ast.ClassDef | None:
        return self._module.classes.get(base.id) if isinstance(base, ast.Name) else None

    def _typed_dict_fields(self, cls: ast.ClassDef) -> dict[str, tuple[Schema, bool]]:
        fields: dict[str, tuple[Schema, bool]] = {}
        for base in cls.bases:
            parent = self._local_base(base)
            if parent is not None:
                with self._entering(parent.name, base):
                    fields.update(self._typed_dict_fields(parent))

        total = _keyword_is_true(cls, "total")
        for name, annotation in _annotated_fields(cls):
            what = f"field '{name}' of '{cls.name}'"
            hint, required = self._requiredness(annotation, total, what)
            fields[name] = (self.schema(hint, what), required)
        return fields

    def _requiredness(self, annotation: ast.expr, total: bool, what: str) -> tuple[ast.expr, bool]:
        node = _unquote(annotation, what)
        if isinstance(node, ast.Subscript):
            kind = self._module.qualname(node.value)
            args = _subscript_args(node)
            if kind in ("typing.Required", "typing.NotRequired") and len(args) == 1:
                return args[0], kind == "typing.Required"
            if kind == "typing.Annotated" and args:
                return self._requiredness(args[0], total, what)
        return node, total

    def _dataclass_fields(self, cls: ast.ClassDef) -> dict[str, tuple[Schema, bool]]:
        fields: dict[str, tuple[Schema, bool]] = {}
        for base in cls.bases:
            parent = self._local_base(base)
            if parent is not None and self._is_dataclass(parent):
                with self._entering(parent.name, base):
                    fields.update(self._dataclass_fields(parent))

        for stmt in cls.body:
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if self._is_skipped_field(stmt.annotation, cls.name):
                continue
            what = f"field '{stmt.target.id}' of '{cls.name}'"
            default = self._field_default(stmt.value)
            fields[stmt.target.id] = self.field(stmt.annotation, default, what)
        return fields

    def _is_skipped_field(self, annotation: ast.expr, owner: str) -> bool:
        node = _unquote(annotation, f"a field of '{owner}'")
        if isinstance(node, ast.Subscript):
            node = node.value
        return self._module.qualname(node) in _SKIPPED_FIELDS

    def _field_default(self, value: ast.expr | None) -> ast.expr | None:
        """The default of a dataclass field; a non-literal node stands for a default_factory."""
        if not isinstance(value, ast.Call):
            return value
        if self._module.qualname(value.func) != "dataclasses.field":
            return value
        for keyword in value.keywords:
            if keyword.arg == "default":
                return keyword.value
            if keyword.arg == "default_factory":
                return value
        return None

    @contextmanager
    def _entering(self, name: str, ref: ast.expr) -> Iterator[None]:
        if name in self._expanding:
            raise SchemaError(
                f"'{name}' refers to itself; a recursive type cannot be inlined into a schema",
                ref.lineno,
            )
        self._expanding.append(name)
        try:
            yield
        finally:
            self._expanding.pop()


def _unquote(node: ast.expr, what: str) -> ast.expr:
    """The expression inside a string annotation (a forward reference), or the node itself."""
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return node
    try:
        parsed = ast.parse(node.value.strip(), mode="eval").body
    except SyntaxError as exc:
        raise SchemaError(f"cannot parse type hint {node.value!r} for {what}", node.lineno) from exc
    for child in ast.walk(parsed):
        if isinstance(child, ast.expr):
            child.lineno = node.lineno
    return parsed


def _subscript_args(node: ast.Subscript) -> list[ast.expr]:
    return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]


def _annotated_fields(cls: ast.ClassDef) -> Iterator[tuple[str, ast.expr]]:
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            yield stmt.target.id, stmt.annotation


def _keyword_is_true(cls: ast.ClassDef, name: str) -> bool:
    for keyword in cls.keywords:
        if keyword.arg == name:
            return not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
    return True


def _unsupported(node: ast.expr, what: str) -> SchemaError:
    return SchemaError(
        f"unsupported type hint '{ast.unparse(node)}' for {what}; {_SUGGESTION}", node.lineno
    )


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items} if items else {"type": "array"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return "number" if isinstance(value, float) else "string"


def _enum(values: list[Any]) -> Schema:
    # Keyed by type too, since True == 1 in Python but not in JSON.
    unique = list({(type(value), value): value for value in values}.values())
    types = list(dict.fromkeys(_json_type(value) for value in unique))
    others = [kind for kind in types if kind != "null"]
    schema: Schema = {}
    if len(others) == 1:
        schema["type"] = [others[0], "null"] if "null" in types else others[0]
    elif not others:
        schema["type"] = "null"
    schema["enum"] = unique
    return schema


def _union(schemas: list[Schema]) -> Schema:
    unique = list({json.dumps(schema, sort_keys=True): schema for schema in schemas}.values())
    if len(unique) == 1:
        return unique[0]
    if {} in unique:
        return {}
    if all(_is_enum(schema) or schema == _NULL for schema in unique):
        return _enum([value for schema in unique for value in schema.get("enum", [None])])
    if all(_is_simple(schema) for schema in unique):
        return {"type": _merge_types(unique)}
    return _any_of(unique)


def _any_of(unique: list[Schema]) -> Schema:
    simple = [schema for schema in unique if _is_simple(schema) and schema != _NULL]
    enums = [schema for schema in unique if _is_enum(schema)]
    members = [schema for schema in unique if not _is_simple(schema) and not _is_enum(schema)]
    if enums:
        members.insert(0, _enum([value for schema in enums for value in schema["enum"]]))
    if simple:
        members.insert(0, {"type": _merge_types(simple)})
    if _NULL in unique:
        members.append(dict(_NULL))
    return members[0] if len(members) == 1 else {"anyOf": members}


def _is_simple(schema: Schema) -> bool:
    return set(schema) == {"type"}


def _is_enum(schema: Schema) -> bool:
    return "enum" in schema and set(schema) <= {"type", "enum"}


def _merge_types(schemas: list[Schema]) -> str | list[str]:
    names: list[str] = []
    for schema in schemas:
        kind = schema["type"]
        names.extend(kind if isinstance(kind, list) else [kind])
    ordered = [name for name in dict.fromkeys(names) if name != "null"]
    if "null" in names:
        ordered.append("null")
    return ordered[0] if len(ordered) == 1 else ordered


def _without_null(schema: Schema) -> Schema:
    if schema.get("type") == "null":
        return schema
    if "anyOf" in schema:
        members = [_without_null(member) for member in schema["anyOf"] if member != _NULL]
        return members[0] if len(members) == 1 else {**schema, "anyOf": members}

    result = dict(schema)
    kind = schema.get("type")
    if isinstance(kind, list) and "null" in kind:
        rest = [name for name in kind if name != "null"]
        result["type"] = rest[0] if len(rest) == 1 else rest
    if "enum" in schema:
        result["enum"] = [value for value in schema["enum"] if value is not None]
    return result


def _accepts_null(schema: Schema) -> bool:
    if "anyOf" in schema:
        return any(_accepts_null(member) for member in schema["anyOf"])
    if "enum" in schema and None not in schema["enum"]:
        return False
    kind = schema.get("type")
    return kind is None or kind == "null" or (isinstance(kind, list) and "null" in kind)


def _may_be_object(schema: Schema) -> bool:
    if "anyOf" in schema:
        return any(_may_be_object(member) for member in schema["anyOf"])
    if "enum" in schema:
        return False
    kind = schema.get("type")
    return kind is None or kind == "object" or (isinstance(kind, list) and "object" in kind)


def _json_default(node: ast.expr) -> Any:
    """The default as a JSON value, or _NO_DEFAULT when it is not a JSON-representable literal."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO_DEFAULT
    return _to_json(value)


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NO_DEFAULT
    if isinstance(value, (list, tuple)):
        items = [_to_json(item) for item in value]
        return _NO_DEFAULT if any(item is _NO_DEFAULT for item in items) else items
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        entries = {key: _to_json(item) for key, item in value.items()}
        return _NO_DEFAULT if any(item is _NO_DEFAULT for item in entries.values()) else entries
    return _NO_DEFAULT


def _split_args_section(doc: str) -> tuple[str, dict[str, str]]:
    """The docstring without its Google-style Args section, and that section's texts by name."""
    lines = doc.splitlines()
    for start, line in enumerate(lines):
        if not _ARGS_HEADER.fullmatch(line.strip()):
            continue
        end = _section_end(lines, start)
        entries = _section_entries(lines[start + 1 : end])
        if entries:
            before = "\n".join(lines[:start]).strip()
            after = "\n".join(lines[end:]).strip()
            return "\n\n".join(part for part in (before, after) if part), entries
    return doc, {}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _section_end(lines: list[str], start: int) -> int:
    for index in range(start + 1, len(lines)):
        if lines[index].strip() and _indent(lines[index]) <= _indent(lines[start]):
            return index
    return len(lines)


def _section_entries(body: list[str]) -> dict[str, str]:
    entries: dict[str, list[str]] = {}
    entry_indent: int | None = None
    current: str | None = None
    for line in body:
        if not line.strip():
            continue
        entry_indent = _indent(line) if entry_indent is None else entry_indent
        match = _ARGS_ENTRY.fullmatch(line.strip())
        if match and _indent(line) <= entry_indent:
            current = match[1]
            entries[current] = [match[2]]
        elif current is not None:
            entries[current].append(line.strip())
    return {name: " ".join(part for part in parts if part) for name, parts in entries.items()}
