"""The one exception type users see: its message is a complete, one-line explanation."""


class FqError(Exception):
    """A user-facing error: bad input, unsupported model, unknown target, missing tool."""


class FqWarning(UserWarning):
    """A user-facing warning (an option that has no effect, a layer that padding bloats): one line.
    fq-compile prints it as `fq-compile: warning: ...` (nothing with -q)."""


def warn(text: str) -> None:
    """Issue an FqWarning attributed to the first caller outside fq_tvm (the user's line)."""
    import os
    import sys
    import warnings

    package, level, frame = os.path.dirname(os.path.abspath(__file__)), 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(text, FqWarning, stacklevel=level)
