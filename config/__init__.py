"""Settings shared by every process role, and logging set-up."""

from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]
