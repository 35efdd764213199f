"""The one exception type the CLI turns into a clean one-line error (exit 2).

Anything raised as `MMTuneError` is a problem with the user's input or
settings, and its message alone must tell them what to fix. Anything else
that escapes is a bug and keeps its traceback.
"""


class MMTuneError(Exception):
    """A user-facing error whose message is one self-explanatory line."""
