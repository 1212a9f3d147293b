"""The one exception type users see: its message is a complete, one-line explanation."""


class FqError(Exception):
    """A user-facing error: bad input, unsupported model, unknown target, missing tool."""
