"""The one error type a user sees: a single line naming the file, what is wrong and what to do."""

from __future__ import annotations

import os


class ImgloraError(Exception):
    """Bad input or a failed job, reported as one line and exit code 2 (RELIABILITY.md §6)."""

    def __init__(self, what: str, fix: str = "", path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.what = what
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.path}: {self.what}" if self.path else self.what
        return f"{text} — {self.fix}" if self.fix else text


def run_command(prog: str, func, args) -> int:
    """Run a CLI command: ImgloraError -> one line on stderr and exit code 2 (a traceback with --debug)."""
    import sys

    try:
        return func(args) or 0
    except ImgloraError as e:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
