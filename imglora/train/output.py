"""What a training run owns on disk: its output folder checked before anything loads, a lock so that one
run at a time writes there, and the command that resumes it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import TrainConfig
from ..errors import ImgloraError, shell_word


def resume_command() -> str:
    """This run's own command line with --resume latest (as typed, when it came from the imglora program)."""
    argv = list(sys.argv)
    if Path(argv[0]).name not in ("imglora", "cli.py"):  # the program, or python -m imglora.cli
        return "the same `imglora train` command with --resume latest"
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i:i + 2]
    return " ".join(shell_word(a) for a in ["imglora", *argv[1:], "--resume", "latest"])


def check_output(out: Path, cfg: TrainConfig) -> None:
    """The output folder can be written and is not a folder the run reads its images from."""
    if out.exists() and not out.is_dir():
        raise ImgloraError("is a file, not a folder", "pass another --output", path=out)
    for flag, data in (("--data", cfg.data), ("--reg-data", cfg.reg_data)):
        if data and out.resolve().is_relative_to(Path(data).resolve()):
            raise ImgloraError(f"--output is inside {flag} {data}: the next run would train on its own samples",
                               "choose an output folder outside the data", path=out)


class OutputLock:
    """One training run per output folder: a second one would prune the first's checkpoints and overwrite
    its files. An flock on OUTPUT/.imglora-train.lock, which the system releases when the process ends
    (even by kill -9), so a stale lock never blocks."""

    def __init__(self, out: Path | None):
        """out None: a process that writes nothing (not the main one under DDP) holds no lock."""
        self.path, self.file = (out / ".imglora-train.lock" if out else None), None
        if out is not None and out.is_dir():
            self.acquire()

    def acquire(self) -> None:
        import fcntl

        if self.file is not None or self.path is None:
            return
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ImgloraError(f"another `imglora train` ({holder}) is writing to this output folder",
                               "wait for it to finish, or pass another --output", path=self.path.parent) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None
