"""Log lines never carry credentials, whatever put them there."""

from __future__ import annotations

import logging

import pytest

from config import Settings
from config.logging import configure_logging, redact


def test_tokens_bearer_values_and_jwts_are_redacted() -> None:
    """API tokens, bearer values and JWTs are replaced in the rendered line."""
    line = ("b'Authorization: Bearer ul_3EJPycSQp6WjZrUMdovWCGcC951E4hud\\x01' "
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.c2lnbmF0dXJl")
    cleaned = redact(None, "info", line)

    assert "ul_3EJP" not in cleaned and "eyJhbGci" not in cleaned
    assert "Bearer [redacted]" in cleaned


def test_a_library_quoting_a_raw_header_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A foreign logger's message (as aiohttp logs a bad request) goes through redaction."""
    configure_logging(Settings.from_env({}, log_format="json"))
    logging.getLogger("aiohttp.server").error(
        "Error handling request: b'Authorization: Bearer ul_abcdefghijklmnopqrstuvwx'")

    assert "ul_abcdefghij" not in capsys.readouterr().err


def test_json_lines_keep_the_traceback_of_a_logged_exception(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An exception logged with exception() arrives with its stack in the JSON line."""
    configure_logging(Settings.from_env({}, log_format="json"))
    try:
        raise KeyError("boom")
    except KeyError:
        logging.getLogger("gateway.app").exception("request_crashed")

    assert "KeyError" in capsys.readouterr().err
