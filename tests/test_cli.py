"""The ``ultralight`` command against a running farm: deploy, versions, promote, call."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import SHARED_APPS, Farm

GOOD = '''"""Says hello."""


def hello(name: str = "world") -> str:
    """Greets someone."""
    return f"hello {name}"
'''
BETTER = GOOD.replace('f"hello {name}"', 'f"hello, {name}!"')


@pytest.fixture()
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "hello.py"
    path.write_text(GOOD)
    return path


def test_deploy_versions_promote_and_call(farm: Farm, app_file: Path) -> None:
    """A draft does not go live until promoted; promote switches back and forth."""
    first = farm.deploy(app_file, "hello")
    app_file.write_text(BETTER)
    draft = farm.deploy(app_file, "hello", "--draft")

    assert farm.cli("call", "hello", "hello", "--args", '{"name": "ann"}').stdout.strip() == (
        '"hello ann"')
    listing = farm.cli("versions", "hello").stdout
    assert f"* {first}" in listing and f"  {draft}" in listing

    farm.cli("promote", "hello", draft[:6])
    assert "hello, ann!" in farm.cli("call", "hello", "hello", "--args", '{"name": "ann"}').stdout
    farm.cli("promote", "hello", first)
    assert farm.cli("call", "hello", "hello").stdout.strip() == '"hello world"'


def test_same_content_is_the_same_version(farm: Farm, app_file: Path) -> None:
    """Versions are keyed by content: deploying identical code twice adds no version."""
    first = farm.deploy(app_file, "same")
    second = farm.deploy(app_file, "same")
    versions = orjson.loads(farm.cli("versions", "same", "--json").stdout)["versions"]

    assert first == second
    assert len(versions) == 1


def test_syntax_error_names_the_line(farm: Farm, tmp_path: Path) -> None:
    """A module that does not parse is refused with the line of the error."""
    broken = tmp_path / "broken.py"
    broken.write_text("def ok() -> int:\n    return 1\n\ndef bad(:\n    pass\n")
    result = farm.cli("deploy", str(broken), "--name", "broken", check=False)

    assert result.returncode == 1
    assert "line 4" in result.stderr and "syntax" in result.stderr
    assert "Traceback" not in result.stderr


def test_unsupported_hint_names_the_line(farm: Farm, tmp_path: Path) -> None:
    """A type hint that cannot become a JSON Schema is refused, naming line and parameter."""
    odd = tmp_path / "odd.py"
    odd.write_text("def f(x: int) -> int:\n    return x\n\n\ndef g(items: set[int]) -> int:\n"
                   "    return len(items)\n")
    result = farm.cli("deploy", str(odd), "--name", "odd", check=False)

    assert result.returncode == 1
    assert "line 5" in result.stderr and "items" in result.stderr


def test_manifest_overrides_description(farm: Farm) -> None:
    """greeter's manifest (found beside the module) replaces a tool's description."""
    farm.deploy(SHARED_APPS / "greeter.py", "greeter")
    with farm.http(farm.token) as http:
        response = http.post("/mcp/greeter", headers=_modern("tools/list"), content=orjson.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": _meta()}))
    tools = {t["name"]: t for t in response.json()["result"]["tools"]}

    assert tools["greet"]["description"] == "Greet the calling user."


def test_call_reports_tool_errors_with_exit_code_1(farm: Farm) -> None:
    """A tool error prints the app's message on stderr and exits 1."""
    farm.deploy(SHARED_APPS / "notes.py", "cli-notes")
    result = farm.cli("call", "cli-notes", "add_note", "--args", '{"text": " "}', check=False)

    assert result.returncode == 1
    assert "a note needs some text" in result.stderr


def test_bad_input_to_the_cli_is_explained(farm: Farm, app_file: Path) -> None:
    """Bad JSON arguments, an unknown app, a missing token: clear messages, no tracebacks."""
    bad_json = farm.cli("call", "hello", "hello", "--args", "{nope", check=False)
    unknown = farm.cli("call", "no-such-app", "f", check=False)
    no_token = farm.cli("deploy", str(app_file), "--name", "x", token="", check=False)
    bad_name = farm.cli("deploy", str(app_file), "--name", "Bad Name!", check=False)

    assert "not valid JSON" in bad_json.stderr
    assert "no app named 'no-such-app'" in unknown.stderr
    assert no_token.returncode == 1 and "401" in no_token.stderr
    assert "invalid app name" in bad_name.stderr
    for result in (bad_json, unknown, no_token, bad_name):
        assert "Traceback" not in result.stderr


def test_other_users_cannot_deploy_over_an_app(farm: Farm, app_file: Path) -> None:
    """An app name belongs to its first owner."""
    farm.deploy(app_file, "mine")
    intruder = farm.new_token("intruder@example.test")
    result = farm.cli("deploy", str(app_file), "--name", "mine", token=intruder, check=False)

    assert result.returncode == 1 and "belongs to another user" in result.stderr


def _meta() -> dict[str, object]:
    return {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}


def _modern(method: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "application/json",
            "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}


@pytest.mark.parametrize(("schema", "phrase"), [
    ({"type": "object", "properties": {"name": {"$ref": "http://127.0.0.1:9/leak"}}}, "'$ref'"),
    ({"type": "object", "properties": {"name": {"type": "string", "pattern": "(a+)+$"}}},
     "'pattern'"),
    ({"type": "object", "properties": {"name": {"type": "nonsense"}}}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"name": {"maxLength": "abc"}}}, "not a valid JSON Schema"),
])
def test_manifest_schemas_are_checked_at_deploy(farm: Farm, app_file: Path, tmp_path: Path,
                                                schema: dict, phrase: str) -> None:
    """References, regular expressions and invalid schemas are refused at deploy, not at call."""
    manifest = tmp_path / "m.json"
    manifest.write_bytes(orjson.dumps({"functions": {"hello": {"inputSchema": schema}}}))
    result = farm.cli("deploy", str(app_file), "--name", "schema-check", "--manifest",
                      str(manifest), check=False)

    assert result.returncode == 1 and phrase in result.stderr


def test_token_create_prints_only_the_token(farm: Farm) -> None:
    """`export ULTRALIGHT_TOKEN=$(ultralight token create)` must work: stdout is the token."""
    out = farm.cli("token", "create", "--email", "clean@example.test").stdout

    assert out.count("\n") == 1 and out.startswith("ul_")


def test_a_token_with_a_line_break_is_a_clear_error(farm: Farm, app_file: Path) -> None:
    """A token pasted with a newline gives one line of explanation, not a traceback."""
    result = farm.cli("deploy", str(app_file), "--name", "x", token=farm.token + "\nX",
                      check=False)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ULTRALIGHT_TOKEN" in result.stderr
