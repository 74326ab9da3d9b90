"""Tests for sdk.schema: tool specs derived statically from an app module's source."""

import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sdk import SdkError
from sdk.schema import SchemaError, ToolSpec, module_description, tools_from_source

APPS = Path(__file__).resolve().parents[2] / "shared" / "apps"
INT_ARRAY = {"type": "array", "items": {"type": "integer"}}
STR_ARRAY = {"type": "array", "items": {"type": "string"}}


def app_tools(name: str) -> dict[str, ToolSpec]:
    source = (APPS / f"{name}.py").read_text()
    return {tool.name: tool for tool in tools_from_source(source, f"{name}.py")}


def tools(source: str) -> list[ToolSpec]:
    return tools_from_source(textwrap.dedent(source))


def tool(source: str) -> ToolSpec:
    return tools(source)[0]


def param(hint: str, default: str = "", prelude: str = "") -> dict[str, Any]:
    """The property schema of parameter `x` of a one-function module."""
    suffix = f" = {default}" if default else ""
    source = f"{prelude}\ndef f(x: {hint}{suffix}):\n    pass\n"
    return tools_from_source(source).pop().input_schema["properties"]["x"]


def is_required(source: str, name: str) -> bool:
    return name in tool(source).input_schema.get("required", [])


def error(source: str) -> SchemaError:
    with pytest.raises(SchemaError) as caught:
        tools(source)
    return caught.value


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# The real example apps


def test_notes_tools_in_source_order() -> None:
    """Every public function of notes.py is a tool, in the order it is defined."""
    assert list(app_tools("notes")) == [
        "add_note",
        "get_note",
        "find_notes",
        "delete_note",
        "count_notes",
    ]


def test_notes_add_note_schema() -> None:
    """add_note needs text; optional tags drop their null, pinned carries its default."""
    spec = app_tools("notes")["add_note"]

    assert spec.input_schema == {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "pinned": {"type": "boolean", "default": False},
        },
        "required": ["text"],
        "additionalProperties": False,
    }
    assert spec.output_schema == {"type": "object"}
    assert spec.wraps_result is False
    assert spec.description == "Save a note and return its key."
    assert spec.line == 7


def test_notes_find_notes_schema() -> None:
    """find_notes has a Literal order with its default and an optional tag that is a string."""
    spec = app_tools("notes")["find_notes"]
    properties = spec.input_schema["properties"]

    assert properties["tag"] == {"type": "string"}
    assert properties["order"] == {
        "type": "string",
        "enum": ["newest", "oldest"],
        "default": "newest",
    }
    assert properties["limit"] == {"type": "integer", "default": 20}
    assert "required" not in spec.input_schema
    assert spec.wraps_result is True
    assert spec.output_schema == {
        "type": "object",
        "properties": {"result": {"type": "array", "items": {"type": "object"}}},
        "required": ["result"],
    }


def test_notes_get_note_output_not_derivable() -> None:
    """`-> dict | None` may or may not be an object, so get_note has no output schema."""
    spec = app_tools("notes")["get_note"]

    assert spec.output_schema is None
    assert spec.wraps_result is False


def test_notes_scalar_results_are_wrapped() -> None:
    """bool and int results are wrapped as {"result": value}."""
    notes = app_tools("notes")

    assert notes["delete_note"].output_schema == {
        "type": "object",
        "properties": {"result": {"type": "boolean"}},
        "required": ["result"],
    }
    assert notes["count_notes"].output_schema["properties"]["result"] == {"type": "integer"}
    assert notes["count_notes"].wraps_result is True


def test_units_convert_length_uses_module_alias() -> None:
    """A module-level `Length = Literal[...]` alias becomes a required enum of all 7 units."""
    spec = app_tools("units")["convert_length"]
    units = ["mm", "cm", "m", "km", "in", "ft", "mi"]

    assert spec.input_schema["properties"] == {
        "value": {"type": "number"},
        "from_unit": {"type": "string", "enum": units},
        "to_unit": {"type": "string", "enum": units},
    }
    assert spec.input_schema["required"] == ["value", "from_unit", "to_unit"]
    assert spec.output_schema["properties"]["result"] == {"type": "number"}


def test_units_echo_is_async() -> None:
    """The async def in units.py is a tool marked async; the others are not."""
    units = app_tools("units")

    assert units["echo"].is_async is True
    assert [name for name, spec in units.items() if spec.is_async] == ["echo"]
    assert units["echo"].input_schema["properties"]["times"] == {"type": "integer", "default": 1}
    assert units["echo"].input_schema["required"] == ["message"]


def test_units_private_names_are_not_tools() -> None:
    """units.py's private _METRES table and imports do not become tools."""
    assert list(app_tools("units")) == [
        "convert_length",
        "celsius_to_fahrenheit",
        "primes_below",
        "echo",
    ]


def test_units_primes_below_returns_wrapped_integer_list() -> None:
    """`-> list[int]` is wrapped as an array of integers."""
    spec = app_tools("units")["primes_below"]

    assert spec.output_schema["properties"]["result"] == {
        "type": "array",
        "items": {"type": "integer"},
    }


def test_digest_summarize_notes_schema() -> None:
    """digest's tag is an optional string and notes_app defaults to "notes"."""
    spec = app_tools("digest")["summarize_notes"]

    assert spec.input_schema == {
        "type": "object",
        "properties": {
            "tag": {"type": "string"},
            "notes_app": {"type": "string", "default": "notes"},
        },
        "additionalProperties": False,
    }
    assert spec.output_schema == {"type": "object"}


def test_greeter_tools_take_no_arguments() -> None:
    """A function without parameters has an empty object schema with no required list."""
    greeter = app_tools("greeter")

    assert greeter["greet"].input_schema == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    assert greeter["greet"].output_schema["properties"]["result"] == {"type": "string"}
    assert greeter["secret_hint"].output_schema == {"type": "object"}


def test_linkcheck_schemas() -> None:
    """check_links takes a required list of URL strings; check_link returns an object."""
    linkcheck = app_tools("linkcheck")

    assert linkcheck["check_links"].input_schema["properties"]["urls"] == {
        "type": "array",
        "items": {"type": "string"},
    }
    assert linkcheck["check_links"].input_schema["required"] == ["urls"]
    assert linkcheck["check_link"].output_schema == {"type": "object"}


@pytest.mark.parametrize("name", ["notes", "units", "digest", "greeter", "linkcheck"])
def test_app_module_description(name: str) -> None:
    """module_description is the module docstring of each real app."""
    source = (APPS / f"{name}.py").read_text()

    description = module_description(source)

    assert description
    assert source.startswith(f'"""{description}"""')


@pytest.mark.parametrize("name", ["notes", "units", "digest", "greeter", "linkcheck"])
def test_app_schemas_are_valid_and_inline(name: str) -> None:
    """Every schema of every real app is valid Draft 2020-12 and uses no $ref or $defs."""
    for spec in app_tools(name).values():
        for schema in (spec.input_schema, spec.output_schema):
            if schema is not None:
                validator(schema)
                assert "$ref" not in json.dumps(schema)
                assert "$defs" not in json.dumps(schema)


@pytest.mark.parametrize(
    ("name", "function", "arguments"),
    [
        ("notes", "add_note", {"text": "hi", "tags": ["a", "b"], "pinned": True}),
        ("notes", "find_notes", {"order": "oldest", "limit": 5}),
        ("notes", "find_notes", {}),
        ("units", "convert_length", {"value": 3.5, "from_unit": "km", "to_unit": "mi"}),
        ("units", "echo", {"message": "hi", "times": 3}),
        ("digest", "summarize_notes", {"tag": "work"}),
        ("greeter", "greet", {}),
        ("linkcheck", "check_links", {"urls": ["https://example.com"]}),
    ],
)
def test_app_schemas_accept_sample_arguments(
    name: str, function: str, arguments: dict[str, Any]
) -> None:
    """A validator built from an app's input schema accepts well-formed arguments."""
    validator(app_tools(name)[function].input_schema).validate(arguments)


@pytest.mark.parametrize(
    ("name", "function", "arguments"),
    [
        ("notes", "find_notes", {"order": "sideways"}),
        ("notes", "add_note", {"tags": ["a"]}),
        ("notes", "add_note", {"text": "hi", "colour": "red"}),
        ("units", "convert_length", {"value": 1, "from_unit": "league", "to_unit": "m"}),
        ("units", "echo", {"message": "hi", "times": "3"}),
    ],
)
def test_app_schemas_reject_bad_arguments(
    name: str, function: str, arguments: dict[str, Any]
) -> None:
    """A validator rejects a bad enum value, a missing or unknown argument, a wrong type."""
    checker = validator(app_tools(name)[function].input_schema)

    assert not checker.is_valid(arguments)


# Type hints


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        ("str", {"type": "string"}),
        ("int", {"type": "integer"}),
        ("float", {"type": "number"}),
        ("bool", {"type": "boolean"}),
        ("None", {"type": "null"}),
        ("Any", {}),
        ("object", {}),
        ("list", {"type": "array"}),
        ("List", {"type": "array"}),
        ("list[int]", {"type": "array", "items": {"type": "integer"}}),
        ("List[str]", {"type": "array", "items": {"type": "string"}}),
        ("Sequence[float]", {"type": "array", "items": {"type": "number"}}),
        ("list[Any]", {"type": "array"}),
        ("tuple[int, ...]", {"type": "array", "items": {"type": "integer"}}),
        (
            "tuple[int, str]",
            {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string"}],
                "minItems": 2,
                "maxItems": 2,
            },
        ),
        ("dict", {"type": "object"}),
        ("Dict", {"type": "object"}),
        ("dict[str, int]", {"type": "object", "additionalProperties": {"type": "integer"}}),
        ("Mapping[str, bool]", {"type": "object", "additionalProperties": {"type": "boolean"}}),
        ("dict[str, Any]", {"type": "object"}),
        ('Literal["a", "b"]', {"type": "string", "enum": ["a", "b"]}),
        ("Literal[1, 2]", {"type": "integer", "enum": [1, 2]}),
        ('Literal[1, "a"]', {"enum": [1, "a"]}),
        ("Literal[True]", {"type": "boolean", "enum": [True]}),
        ('Literal["a", None]', {"type": ["string", "null"], "enum": ["a", None]}),
        ('Optional[Literal["a"]]', {"type": ["string", "null"], "enum": ["a", None]}),
        ("int | str", {"type": ["integer", "string"]}),
        ("Union[int, str]", {"type": ["integer", "string"]}),
        ("Optional[int]", {"type": ["integer", "null"]}),
        ("str | None", {"type": ["string", "null"]}),
        ("None | str", {"type": ["string", "null"]}),
        ("int | Any", {}),
        ("int | list[int]", {"anyOf": [{"type": "integer"}, INT_ARRAY]}),
        ('Annotated[int, "a count"]', {"type": "integer"}),
        ("typing.Optional[typing.List[int]]", {"anyOf": [INT_ARRAY, {"type": "null"}]}),
        ("t.Dict[str, t.Any]", {"type": "object"}),
        ('"int"', {"type": "integer"}),
        ('"list[str] | None"', {"anyOf": [STR_ARRAY, {"type": "null"}]}),
    ],
)
def test_hint_schema(hint: str, expected: dict[str, Any]) -> None:
    """Each supported hint, in bare, typing., t. and string forms, maps to its JSON Schema."""
    prelude = (
        "import typing\nimport typing as t\nfrom collections.abc import Sequence, Mapping\n"
        "from typing import Any, Annotated, Dict, List, Literal, Optional, Union\n"
    )

    schema = param(hint, prelude=prelude)

    assert schema == expected
    validator(schema)


def test_typing_names_imported_under_another_name() -> None:
    """`from typing import Optional as Maybe` resolves through the alias."""
    schema = param("Maybe[int]", prelude="from typing import Optional as Maybe")

    assert schema == {"type": ["integer", "null"]}


def test_typing_extensions_names_resolve_like_typing() -> None:
    """Hints imported from typing_extensions behave as their typing counterparts."""
    schema = param('Literal["x"]', prelude="from typing_extensions import Literal")

    assert schema == {"type": "string", "enum": ["x"]}


def test_dict_with_non_string_keys_is_rejected() -> None:
    """dict[int, str] cannot be a JSON object, so it is an error naming the line."""
    exc = error("""
        def f(x: dict[int, str]) -> None:
            pass
    """)

    assert exc.line == 2
    assert "dict keys must be str" in str(exc)
    assert str(exc).startswith("line 2: ")


# Type aliases, TypedDicts and dataclasses


def test_type_alias_forms() -> None:
    """Plain and TypeAlias-annotated module-level aliases are resolved and inlined."""
    spec = tool("""
        from typing import Literal, TypeAlias
        Unit = Literal["mm", "cm"]
        Units: TypeAlias = "list[Unit]"
        def f(one: Unit, many: Units):
            pass
    """)

    assert spec.input_schema["properties"] == {
        "one": {"type": "string", "enum": ["mm", "cm"]},
        "many": {"type": "array", "items": {"type": "string", "enum": ["mm", "cm"]}},
    }


def test_alias_of_union_flattens_into_outer_union() -> None:
    """An alias that is itself a union merges with the union it appears in."""
    schema = param("Number | None", prelude="Number = int | float")

    assert schema == {"type": ["integer", "number", "null"]}


TYPED_DICTS = """
    from typing import NotRequired, Required, TypedDict
    import typing

    class Author(TypedDict):
        name: str
        email: NotRequired[str]

    class Note(typing.TypedDict, total=False):
        text: Required[str]
        tags: list[str]
        author: Author

    def save(note: Note, extra: "Note | None" = None) -> Note:
        pass
"""


def test_typed_dict_is_inlined() -> None:
    """A TypedDict becomes an inline object, honouring total=False, Required and NotRequired."""
    spec = tool(TYPED_DICTS)
    author = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    note = {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "author": author,
        },
        "required": ["text"],
        "additionalProperties": False,
    }

    assert spec.input_schema["properties"] == {"note": note, "extra": note}
    assert spec.input_schema["required"] == ["note"]
    assert spec.output_schema == note
    assert spec.wraps_result is False
    assert "$ref" not in json.dumps([spec.input_schema, spec.output_schema])


def test_typed_dict_schema_validates_arguments() -> None:
    """A validator built from an inlined TypedDict checks nested fields."""
    checker = validator(tool(TYPED_DICTS).input_schema)

    checker.validate({"note": {"text": "hi", "author": {"name": "Ann"}}})
    assert not checker.is_valid({"note": {"tags": []}})
    assert not checker.is_valid({"note": {"text": "hi", "author": {"email": "a@b.c"}}})
    assert not checker.is_valid({"note": {"text": "hi", "colour": "red"}})


def test_typed_dict_inherits_fields_from_local_base() -> None:
    """A TypedDict subclass of another local TypedDict has the base's fields first."""
    schema = param("Child", prelude=textwrap.dedent("""
        from typing import TypedDict
        class Base(TypedDict):
            a: int
        class Child(Base, total=False):
            b: str
    """))

    assert schema["properties"] == {"a": {"type": "integer"}, "b": {"type": "string"}}
    assert schema["required"] == ["a"]


def test_dataclass_is_inlined() -> None:
    """A dataclass becomes an object; fields with defaults are optional; ClassVar is skipped."""
    spec = tool("""
        import dataclasses
        from dataclasses import dataclass, field
        from typing import ClassVar

        @dataclass
        class Point:
            x: float
            y: float = 0.0

        @dataclasses.dataclass(frozen=True)
        class Shape:
            kind: ClassVar[str] = "shape"
            points: list[Point] = field(default_factory=list)
            label: str | None = None
            colour: str = field(default="red")

        def draw(shape: Shape) -> Point:
            pass
    """)
    point = {
        "type": "object",
        "properties": {"x": {"type": "number"}, "y": {"type": "number", "default": 0.0}},
        "required": ["x"],
        "additionalProperties": False,
    }

    assert spec.input_schema["properties"]["shape"] == {
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": point},
            "label": {"type": "string"},
            "colour": {"type": "string", "default": "red"},
        },
        "additionalProperties": False,
    }
    assert spec.output_schema == point
    validator(spec.input_schema).validate({"shape": {"points": [{"x": 1}], "label": "a"}})


def test_recursive_typed_dict_is_rejected() -> None:
    """A TypedDict that contains itself cannot be inlined: an error names the line."""
    exc = error("""
        from typing import TypedDict

        class Tree(TypedDict):
            value: int
            children: list["Tree"]

        def f(tree: Tree):
            pass
    """)

    assert exc.line == 6
    assert "'Tree' refers to itself" in str(exc)


def test_mutually_recursive_dataclasses_are_rejected() -> None:
    """Two dataclasses that refer to each other are rejected as recursive."""
    exc = error("""
        from dataclasses import dataclass

        @dataclass
        class A:
            b: "B"

        @dataclass
        class B:
            a: A | None = None

        def f(a: A):
            pass
    """)

    assert "refers to itself" in str(exc)
    assert exc.line == 10


def test_same_type_twice_is_not_recursion() -> None:
    """A type used by two fields side by side is inlined twice, not reported as recursive."""
    schema = param("Pair", prelude=textwrap.dedent("""
        from typing import TypedDict
        class Point(TypedDict):
            x: int
        class Pair(TypedDict):
            a: Point
            b: Point
    """))

    assert schema["properties"]["a"] == schema["properties"]["b"]


def test_plain_class_is_unsupported() -> None:
    """A class that is neither a TypedDict nor a dataclass is an unsupported hint."""
    exc = error("""
        class Thing:
            pass

        def f(x: Thing):
            pass
    """)

    assert str(exc).startswith("line 5: unsupported type hint 'Thing' for parameter 'x' of 'f'")


# Nullability and defaults


def test_optional_with_none_default_is_not_required_and_not_null() -> None:
    """`x: str | None = None` is a plain string that may be left out."""
    source = "def f(x: str | None = None):\n    pass\n"

    assert param("str | None", "None") == {"type": "string"}
    assert not is_required(source, "x")


def test_nullable_without_default_is_required() -> None:
    """`x: str | None` with no default is required and accepts null."""
    source = "def f(x: str | None):\n    pass\n"

    assert param("str | None") == {"type": ["string", "null"]}
    assert is_required(source, "x")
    validator(tool(source).input_schema).validate({"x": None})


def test_complex_nullable_uses_any_of() -> None:
    """A nullable TypedDict with no default is anyOf the object and null."""
    prelude = "from typing import TypedDict\nclass P(TypedDict):\n    a: int\n"

    schema = param("P | None", prelude=prelude)

    assert schema["anyOf"][1] == {"type": "null"}
    assert schema["anyOf"][0]["type"] == "object"
    assert param("P | None", "None", prelude=prelude)["type"] == "object"


def test_none_default_strips_null_from_literal() -> None:
    """An optional Literal with a None default is a plain enum without null."""
    schema = param('Literal["a", "b"] | None', "None", prelude="from typing import Literal")

    assert schema == {"type": "string", "enum": ["a", "b"]}


def test_none_default_on_untyped_or_any_parameter_is_kept() -> None:
    """A None default stays when the schema accepts anything, null included."""
    spec = tool("def f(x=None, y: object = None):\n    pass\n")

    assert spec.input_schema["properties"] == {"x": {"default": None}, "y": {"default": None}}
    assert "required" not in spec.input_schema


def test_none_default_on_non_nullable_hint_is_omitted() -> None:
    """`x: int = None` is optional but carries no null default."""
    assert param("int", "None") == {"type": "integer"}


@pytest.mark.parametrize(
    ("hint", "default", "expected"),
    [
        ("int", "-3", {"type": "integer", "default": -3}),
        ("float", "1.5", {"type": "number", "default": 1.5}),
        ("list[int]", "(1, 2)", {"type": "array", "items": {"type": "integer"}, "default": [1, 2]}),
        ("dict", '{"a": [1]}', {"type": "object", "default": {"a": [1]}}),
        ("list", "{1, 2}", {"type": "array"}),
        ("float", 'float("inf")', {"type": "number"}),
        ("int", "len('ab')", {"type": "integer"}),
    ],
)
def test_defaults(hint: str, default: str, expected: dict[str, Any]) -> None:
    """JSON-representable literal defaults are kept (tuples as lists); others are dropped."""
    source = f"def f(x: {hint} = {default}):\n    pass\n"

    assert param(hint, default) == expected
    assert not is_required(source, "x")


def test_untyped_parameter_accepts_any_value() -> None:
    """A parameter with no annotation has the empty schema and is required."""
    spec = tool("def f(x):\n    pass\n")

    assert spec.input_schema["properties"] == {"x": {}}
    assert spec.input_schema["required"] == ["x"]


def test_keyword_only_parameters_are_properties() -> None:
    """Parameters after `*` become properties, with their own defaults."""
    spec = tool("def f(a: int, *, b: str, c: bool = True):\n    pass\n")

    assert spec.input_schema["properties"]["c"] == {"type": "boolean", "default": True}
    assert spec.input_schema["required"] == ["a", "b"]


# Output schemas


@pytest.mark.parametrize(
    ("hint", "output", "wraps"),
    [
        ("None", None, False),
        ("Any", None, False),
        ("dict | list", None, False),
        ("dict[str, int]", {"type": "object", "additionalProperties": {"type": "integer"}}, False),
        ("float", {"type": "number"}, True),
        ("int | None", {"type": ["integer", "null"]}, True),
        ('Literal["a"]', {"type": "string", "enum": ["a"]}, True),
    ],
)
def test_output_schema(hint: str, output: dict[str, Any] | None, wraps: bool) -> None:
    """Objects are the output schema, scalars are wrapped, ambiguous hints have none."""
    source = f"from typing import Any, Literal\ndef f() -> {hint}:\n    pass\n"

    spec = tools_from_source(source)[0]

    if wraps:
        assert spec.output_schema == {
            "type": "object",
            "properties": {"result": output},
            "required": ["result"],
        }
    else:
        assert spec.output_schema == output
    assert spec.wraps_result is wraps


def test_missing_return_annotation_has_no_output_schema() -> None:
    """Without a return hint the output schema is None."""
    spec = tool("def f():\n    pass\n")

    assert spec.output_schema is None
    assert spec.wraps_result is False


# Which functions are tools


def test_only_public_top_level_functions_are_tools() -> None:
    """Private, nested-in-class and nested-in-if functions are skipped; decorated ones count."""
    names = [spec.name for spec in tools("""
        import functools

        def _helper():
            pass

        class Box:
            def method(self):
                pass

        if True:
            def hidden():
                pass

        @functools.cache
        def cached() -> int:
            return 1

        async def later():
            pass
    """)]

    assert names == ["cached", "later"]


def test_description_is_cleaned_docstring() -> None:
    """The tool description is the dedented docstring, "" when there is none."""
    specs = tools('''
        def f():
            """First line.

            Detail.
                Indented detail.
            """

        def g():
            pass
    ''')

    assert specs[0].description == "First line.\n\nDetail.\n    Indented detail."
    assert specs[1].description == ""


def test_args_section_becomes_property_descriptions() -> None:
    """A Google-style Args section describes each parameter and leaves the description."""
    spec = tool('''
        def f(city: str, days: int = 3):
            """Weather forecast.

            Args:
                city: Name of the city,
                    in English.
                days (int): How many days ahead.

            Returns:
                The forecast.
            """
    ''')

    assert spec.description == "Weather forecast.\n\nReturns:\n    The forecast."
    assert spec.input_schema["properties"] == {
        "city": {"type": "string", "description": "Name of the city, in English."},
        "days": {"type": "integer", "default": 3, "description": "How many days ahead."},
    }


def test_module_description_empty_without_docstring() -> None:
    """A module without a docstring has an empty description."""
    assert module_description("x = 1\n") == ""


# Errors


def test_syntax_error_names_the_line() -> None:
    """A syntax error becomes a SchemaError with the offending line."""
    exc = error("""
        def ok():
            pass

        def broken(:
            pass
    """)

    assert exc.line == 5
    assert str(exc).startswith("line 5: syntax error: ")
    assert isinstance(exc, SdkError)


def test_module_without_public_function_is_rejected() -> None:
    """A module with only private functions cannot become tools."""
    exc = error("def _private():\n    pass\n")

    assert "no public function" in str(exc)


def test_unsupported_parameter_hint_message() -> None:
    """An unsupported parameter hint names the line, the hint, parameter and function."""
    exc = error("""
        def ok(a: int):
            pass

        def f(x: set[int]):
            pass
    """)

    assert str(exc) == (
        "line 5: unsupported type hint 'set[int]' for parameter 'x' of 'f'; use str, int, "
        "float, bool, None, Literal, list[...], dict[str, ...], a TypedDict or a dataclass"
    )
    assert exc.line == 5


@pytest.mark.parametrize(
    "hint", ["Callable[[int], int]", "set[int]", "bytes", "Optional", "UnknownName"]
)
def test_unsupported_return_hint_message(hint: str) -> None:
    """An unsupported return hint says it is the return type of the function."""
    source = f"from typing import Callable, Optional\n\ndef f() -> {hint}:\n    pass\n"

    with pytest.raises(SchemaError) as caught:
        tools_from_source(source)

    assert str(caught.value).startswith(f"line 3: unsupported type hint '{hint}'")
    assert "for return type of 'f'" in str(caught.value)


@pytest.mark.parametrize(
    ("signature", "needle"),
    [
        ("def f(a: int, *args: int):", "'f' takes *args"),
        ("def f(**kwargs):", "'f' takes **kwargs"),
        ("def f(a: int, /, b: int):", "parameter 'a' of 'f' is positional-only"),
    ],
)
def test_parameters_without_names_are_rejected(signature: str, needle: str) -> None:
    """*args, **kwargs and positional-only parameters are rejected with the line."""
    exc = error(f"\n\n{signature}\n    pass\n")

    assert exc.line == 3
    assert needle in str(exc)
    assert "keyword arguments" in str(exc)


def test_recursive_alias_is_rejected() -> None:
    """An alias that refers to itself, directly or through another, is an error, not a hang."""
    direct = error("\nTree = list['Tree']\n\ndef f(x: Tree):\n    pass\n")
    indirect = error("\nA = B\nB = A\n\ndef f(x: A):\n    pass\n")

    assert "'Tree' refers to itself" in str(direct)
    assert direct.line == 2
    assert "refers to itself" in str(indirect)
