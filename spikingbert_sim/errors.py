"""Errors a user can cause. The CLI turns each into a one-line message and a non-zero exit."""


class SpikingBertError(Exception):
    """Base class: a problem with the user's input, files or options (not a bug)."""


class ConfigError(SpikingBertError, ValueError):
    """A configuration field has an impossible value."""


class CheckpointError(SpikingBertError):
    """A checkpoint file is missing, corrupt, unsafe or from an unsupported format version."""


class DataError(SpikingBertError, ValueError):
    """Task data is missing or malformed (the message names the file and line)."""
