"""Exit statuses and the errors that map to them (one top-level mapper: app.run)."""
from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1            # stap/staprun failed, environment not ready
    USAGE = 2            # bad command line: nothing was run
    INTERRUPTED = 130    # Ctrl-C (128 + SIGINT), after reporting what was collected


class TcpipstatError(Exception):
    """An error with a one-line message for the user (and, often, the fix)."""
    status = ExitStatus.ERROR

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(TcpipstatError):
    status = ExitStatus.USAGE


class EnvironmentNotReady(TcpipstatError):
    """stap missing, not root, no debuginfo...: detected before or while compiling."""


class StapFailed(TcpipstatError):
    """stap or staprun failed; message names the pass and the first error line."""


class RecordParseError(TcpipstatError):
    def __init__(self, source: str, lineno: int, line: str, why: str):
        shown = line if len(line) <= 200 else line[:200] + "..."
        super().__init__(f"{source}:{lineno}: {why}: {shown!r}")
        self.source, self.lineno, self.line, self.why = source, lineno, line, why


def one_line(text: str) -> str:
    """``text`` with every control or otherwise unprintable character written as a Python
    escape (``\\n``, ``\\x1b``): a message names bad input without letting it split the
    line or reach the terminal as a control sequence."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
