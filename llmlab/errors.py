"""Errors for bad input: one readable message that names the setting and the fix."""


class ConfigError(ValueError):
    """An impossible or wrong setting, found before any weights load."""
