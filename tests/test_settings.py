"""Settings: defaults from config/, overridden by ULTRALIGHT_* variables, then by flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Settings, SettingsError


def test_environment_overrides_defaults() -> None:
    """Each field reads ULTRALIGHT_<NAME>, converted to the field's type."""
    settings = Settings.from_env({"ULTRALIGHT_PORT": "9001", "ULTRALIGHT_CALL_TIMEOUT_S": "2.5",
                                  "ULTRALIGHT_DATA_DIR": "/srv/ul"})

    assert settings.port == 9001
    assert settings.call_timeout_s == 2.5
    assert settings.data_dir == Path("/srv/ul")
    assert settings.resolved_database_url == "sqlite:////srv/ul/ultralight.db"


def test_explicit_overrides_win_over_environment() -> None:
    """A command-line flag beats the environment."""
    settings = Settings.from_env({"ULTRALIGHT_PORT": "9001"}, port=9002)

    assert settings.port == 9002


def test_bad_values_name_the_variable() -> None:
    """A value of the wrong type is a clear error naming the variable."""
    with pytest.raises(SettingsError, match="ULTRALIGHT_PORT='eighty' is not a valid int"):
        Settings.from_env({"ULTRALIGHT_PORT": "eighty"})


def test_origin_allowlist_is_parsed() -> None:
    """Extra allowed origins are a comma-separated list, trailing slashes ignored."""
    settings = Settings.from_env({"ULTRALIGHT_ALLOWED_ORIGINS": "https://a.test/, https://b.test"})

    assert settings.origin_allowlist == {"https://a.test", "https://b.test"}
