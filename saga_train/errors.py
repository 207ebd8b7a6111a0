"""The one base class of the errors a user can fix: a setting, a path, a missing or damaged file.

Every CLI of the project (``python -m saga_train``, ``saga_train.retrieve``, ``saga_train.synthetic``, the
experiment scripts) prints a ``UserError`` as ``error: <message>`` and exits with status 2; any other exception is
a bug and keeps its traceback. The readers of ``saga_train.files`` turn what json, safetensors, faiss or PIL raise for
an empty, truncated or garbage file (or one without a key it needs) into a ``UserError`` naming the file.
"""


class UserError(Exception):
    """An error in what the user gave (or in a file on disk), with a message that says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration key or value that does not exist or cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class DamagedFileError(UserError, ValueError):
    """A file that exists but cannot be used: empty, truncated, not its format, or without a key it needs. The
    readers of ``saga_train.files`` raise it (or the caller's own subclass of ``UserError``) naming the file."""


class WriteError(UserError, OSError):
    """A file that cannot be written (no such directory, no permission, no space left, a directory in the way); the
    message names the file. Raised by the writers of ``saga_train.atomic``."""
