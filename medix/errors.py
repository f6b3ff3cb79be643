"""Errors meant for the user: printed as one line, without a traceback, by the entry points."""


class MedixError(Exception):
    """A problem with the user's input, config or environment that the user can fix."""


class DataError(MedixError):
    """A dataset or benchmark row that cannot be used (names the row and the field)."""


class JudgeError(MedixError):
    """The judge could not give a verdict (server down, bad reply, too many failures)."""


class ConfigError(MedixError):
    """A config value that is missing or out of range (names the key)."""
