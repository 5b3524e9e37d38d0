"""The one error type a user sees: a single line naming the file, what is wrong and what to do."""

from __future__ import annotations

import os
import shlex


def shown(path) -> str:
    """A path (or name) as the CLIs print it: as it is, or repr-style ('a\\nb.png') when it holds a newline, a
    terminal escape or another character that is not printable, so no file name can break or restyle a line."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text if text.isprintable() else repr(text)


def escaped(text: str) -> str:
    """`text` with each unprintable character written as its escape (\\n, \\x1b): a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def shell_word(path) -> str:
    """A path as one word of a command to copy and paste (quoted where needed; repr-style if unprintable)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return shlex.quote(text) if text.isprintable() else repr(text)


class ImgloraError(Exception):
    """Bad input or a failed job, reported as one line and exit code 2 (RELIABILITY.md §6)."""

    def __init__(self, what: str, fix: str = "", path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.what = what
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{shown(self.path)}: {escaped(self.what)}" if self.path else escaped(self.what)
        return f"{text} — {escaped(self.fix)}" if self.fix else text


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
    except OSError as e:  # a read-only folder, a full disk, a path through a file: the system's reason, one line
        if getattr(args, "debug", False):
            raise
        where = f"{shown(e.filename)}: " if e.filename else ""
        print(f"{prog}: {where}{escaped(e.strerror or str(e))} — check the path, its permissions and free space "
              "(--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
