"""The Train tab's runs: each one an `imglora train` process of its own, started one after another from a queue.

A run is the folder OUTPUTS/runs/NAME: run.toml (the TOML `imglora train --config` reads, written once),
console.log (the process's output) and what the trainer writes there itself (logs/train.jsonl, samples/,
checkpoints/, NAME.safetensors). Progress is read back from those files, so a run belongs to the server,
not to a browser tab: a reloaded or second tab sees it, and it goes on when every tab is closed; a
restarted app finds its runs again in the folder. Stop sends SIGINT, the trainer's Ctrl-C: it saves a
checkpoint at the end of the step and exits, and Resume continues with `--resume latest`. A finished
run's adapter is hard-linked into the adapters folder under a free name (a user's file is never replaced).

No gradio in this module: ui/tabs/train.py shows it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from imglora.config import FIELDS, TrainConfig, to_dict, to_toml
from imglora.errors import ImgloraError
from imglora.formats.files import atomic_write
from imglora.pipeline import adapter_name
from imglora.train.checkpoint import complete_checkpoints

from .catalogue import SUFFIX, check_name

LOG = "console.log"
CONFIG = "run.toml"
# What the trainer prints once its data is scanned: "...; 600 steps = 10.0 epochs" (the total, --epochs included).
TOTAL = re.compile(rb"; (\d+) steps = ")
BAR = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm progress line: "training:  50%|█████     | 3/6 ..."


@dataclass
class Progress:
    step: int = 0
    total: int | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds_per_step: float | None = None  # wall time, samples and validation included
    samples: list[Path] = field(default_factory=list)  # sample grids, oldest first
    tail: list[str] = field(default_factory=list)  # the last lines of the process's output

    @property
    def eta(self) -> float | None:
        if self.seconds_per_step is None or self.total is None:
            return None
        return max(0, self.total - self.step) * self.seconds_per_step


class Run:
    def __init__(self, name: str, folder: Path, state: str = "queued", message: str = ""):
        self.name, self.folder = name, folder
        self.state = state  # queued, running, stopping, stopped, finished, failed
        self.message = message
        self.adapter: str | None = None  # its name in the adapters folder, once finished
        self.proc: subprocess.Popen | None = None
        self.settings = tomllib.loads((folder / CONFIG).read_text(encoding="utf-8"))
        self._cache: tuple | None = None
        self._total: int | None = None

    @property
    def checkpoint(self) -> Path | None:
        found = complete_checkpoints(self.folder / "checkpoints")
        return found[-1] if found else None

    @property
    def final(self) -> Path:
        return self.folder / f"{self.name}{SUFFIX}"

    def progress(self) -> Progress:
        """What the run's files say now (read again only when they changed)."""
        files = [self.folder / "logs" / "train.jsonl", self.folder / LOG, self.folder / "samples"]
        stamp = tuple((s.st_size, s.st_mtime_ns) if (s := _stat(p)) else None for p in files)
        if self._cache and self._cache[0] == stamp:
            return self._cache[1]
        p = Progress()
        loss, val, times = {}, {}, []
        for row in _rows(files[0]):
            step = row.get("step")
            if not isinstance(step, int):
                continue
            if isinstance(row.get("loss"), (int, float)):
                loss[step] = row["loss"]  # a resumed run logs again from its checkpoint: the later value wins
                times.append((step, row.get("time")))
            if isinstance(row.get("val_loss"), (int, float)):
                val[step] = row["val_loss"]
        p.loss, p.val_loss = sorted(loss.items()), sorted(val.items())
        p.step = max(loss, default=0)
        p.seconds_per_step = _pace(times[-21:])
        console = _tail(files[1]) if stamp[1] else b""  # the process's output grows with every progress-bar redraw
        totals = TOTAL.findall(console)
        if totals:
            self._total = int(totals[-1])  # the trainer's own count (--epochs included); the same when resumed
        steps, epochs = self.settings.get("steps"), self.settings.get("epochs")
        p.total = self._total or steps or (None if epochs else 500)  # 500: the trainer's default
        p.samples = sorted(files[2].glob("step-*.png")) if stamp[2] else []
        lines = [seg.split("\r")[-1] for seg in console.decode("utf-8", "replace").splitlines()[-200:]]
        lines = [line for line in lines if line.strip()]
        # tqdm redraws its bar after every message: only the newest bar line is worth showing.
        bars = [i for i, line in enumerate(lines) if BAR.match(line)]
        p.tail = [line for i, line in enumerate(lines) if i not in bars[:-1]][-12:]
        self._cache = (stamp, p)
        return p

    def row(self) -> list:
        """[name, state, step, time left, adapter] for the runs table."""
        p = self.progress()
        eta = p.eta if self.state == "running" else None
        return [self.name, self.state, f"{p.step}/{p.total or '?'}", _duration(eta) if eta is not None else "",
                self.adapter or ""]


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


def _tail(path: Path, size: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read()
    except OSError:
        return b""


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the line being written
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _pace(times: list[tuple]) -> float | None:
    """Seconds per step over the last steps; a pause (the run stopped and resumed) is left out."""
    pairs = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(times, times[1:])
             if isinstance(t0, (int, float)) and isinstance(t1, (int, float)) and s1 > s0]
    if not pairs:
        return None
    per = sorted(dt / ds for ds, dt in pairs)
    typical = per[len(per) // 2]
    kept = [(ds, dt) for ds, dt in pairs if dt / ds <= 10 * typical + 1]
    return sum(dt for _, dt in kept) / sum(ds for ds, _ in kept)


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class Jobs:
    """The runs under OUTPUTS/runs, and the queue that starts them one at a time."""

    def __init__(self, outputs, adapters, fixed: dict | None = None, python: str = sys.executable, on_publish=None):
        """fixed: the settings the app decides for every run (model, model_config: the model it serves, so
        that the adapter fits it). on_publish(): called after a finished run's adapter joined the folder."""
        self.root = Path(outputs).expanduser().resolve() / "runs"
        self.adapters = Path(adapters).expanduser().resolve()
        self.fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
        self.python = python
        self.on_publish = on_publish
        self.runs: dict[str, Run] = {}
        self.queue: list[str] = []
        self.published = 0  # how many adapters joined the folder: the page lists it again when this changes
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._find_runs()

    # -- what is there ------------------------------------------------------------------------------
    def _find_runs(self) -> None:
        """The runs of an earlier session of the app: finished, or stopped (resumable if they have a checkpoint)."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir(), key=lambda p: p.lstat().st_mtime):
            try:
                name = check_name(folder.name)
                run = Run(name, folder, "stopped")
            except (ImgloraError, OSError, ValueError):
                continue
            ckpt = run.checkpoint
            if run.final.exists():
                run.state, run.message = "finished", f"adapter: {run.final.name} in its run folder"
            else:
                run.message = (f"stopped: checkpoint {ckpt.name}; Resume continues from it" if ckpt else
                               "no checkpoint: Resume starts it again from step 1")
            self.runs[name] = run

    def get(self, name) -> Run:
        run = self.runs.get(check_name(name))
        if run is None:
            raise ImgloraError(f"no run named {name!r}", "choose a run from the list")
        return run

    def current(self) -> Run | None:
        """The run a page shows first: the running one, else the next queued, else the newest."""
        with self._lock:
            for state in ("running", "stopping", "queued"):
                for run in self.runs.values():
                    if run.state == state:
                        return run
            return next(reversed(self.runs.values()), None)

    # -- changes ------------------------------------------------------------------------------------
    def submit(self, name, cfg: TrainConfig) -> Run:
        """A new run NAME of `cfg` (its data decided by the caller), queued. Its output, name and model are set here."""
        name = check_name(name)
        folder = self.root / name
        with self._lock:
            if name in self.runs or os.path.lexists(folder):
                raise ImgloraError(f"there is already a run named {name!r}", "choose another name, or resume that run")
            cfg = TrainConfig(**{**to_dict(cfg), **self.fixed, "output": str(folder), "name": name, "resume": None,
                                 "overwrite": False})
            cfg.check()
            self.root.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            values = {k: v for k, v in to_dict(cfg).items() if v not in (None, []) and v != FIELDS[k].default}
            text = to_toml({**values, "output": str(folder), "name": name})
            atomic_write(folder / CONFIG, lambda f: f.write(text.encode("utf-8")))
            run = Run(name, folder)
            self.runs[name] = run
            self._enqueue(run)
            return run

    def resume(self, name) -> Run:
        """Queue a stopped or failed run again: from its newest checkpoint, or from step 1 if it has none."""
        with self._lock:
            run = self.get(name)
            if run.state in ("queued", "running", "stopping"):
                raise ImgloraError(f"run {run.name!r} is {run.state}", "wait for it, or stop it first")
            if run.state == "finished":
                raise ImgloraError(f"run {run.name!r} has finished", "start a new run to train further")
            self._enqueue(run)
            return run

    def stop(self, name) -> str:
        """A queued run leaves the queue; a running one gets SIGINT (it saves a checkpoint, then exits)."""
        with self._lock:
            run = self.get(name)
            if run.state == "queued":
                self.queue.remove(run.name)
                run.state, run.message = "stopped", "taken out of the queue"
                return f"{run.name}: taken out of the queue"
            if run.state != "running":
                raise ImgloraError(f"run {run.name!r} is not running ({run.state})", "")
            run.state, run.message = "stopping", "saving a checkpoint at the end of this step"
            try:
                run.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass  # it ended meanwhile; the worker records how
            return f"{run.name}: stopping (a checkpoint is saved at the end of the step)"

    def shutdown(self, timeout: float = 60) -> None:
        """Stop the queue and the running run (it saves its checkpoint, so it can be resumed), then wait for it."""
        with self._lock:
            self._closing = True
            running = [r for r in self.runs.values() if r.state == "running"]
            self._lock.notify_all()
        for run in running:
            try:
                self.stop(run.name)
            except ImgloraError:
                pass
        if self._worker is not None:
            self._worker.join(timeout)

    # -- the queue ----------------------------------------------------------------------------------
    def _enqueue(self, run: Run) -> None:
        ahead = len(self.queue) + sum(r.state in ("running", "stopping") for r in self.runs.values())
        run.state, run.message = "queued", f"{ahead} run(s) ahead" if ahead else "starting"
        self.queue.append(run.name)
        if self._worker is None or not self._worker.is_alive():
            self._closing = False
            self._worker = threading.Thread(target=self._work, name="imglora-train-queue", daemon=True)
            self._worker.start()
        self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self.queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                run = self.runs[self.queue.pop(0)]
                self._start(run)
            if run.proc is None:
                continue
            rc = run.proc.wait()
            with self._lock:
                self._ended(run, rc)

    def _start(self, run: Run) -> None:
        cmd = [self.python, "-m", "imglora.cli", "train", "--config", str(run.folder / CONFIG)]
        if run.checkpoint is not None:
            cmd += ["--resume", "latest"]
        try:
            with open(run.folder / LOG, "ab") as log:
                log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[1:])}\n".encode())
                log.flush()
                # Its own session: a Ctrl-C in the app's terminal reaches the app, which stops the run itself
                # (once, so the trainer saves its checkpoint), not both at once.
                run.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        except OSError as e:
            run.proc, run.state, run.message = None, "failed", f"could not start: {e.strerror or e}"
            return
        run.state, run.message = "running", ""

    def _ended(self, run: Run, rc: int) -> None:
        run.proc = None
        stopping = run.state == "stopping"
        if rc == 0:
            run.state = "finished"
            try:
                run.adapter = self._publish(run)
                run.message = f"finished: in the adapters list as {run.adapter}"
            except (ImgloraError, OSError) as e:
                run.message = f"finished, but could not add it to the adapters folder ({e}); it is {run.final}"
        elif stopping or rc in (130, -signal.SIGINT):
            run.state = "stopped"
            ckpt = run.checkpoint
            run.message = (f"stopped: checkpoint {ckpt.name}; Resume continues from it" if ckpt else
                           "stopped before its first checkpoint: Resume starts it again from step 1")
        else:
            run.state = "failed"
            tail = run.progress().tail
            errors = [line for line in tail if line.startswith("imglora:")]
            run.message = (errors or tail or [f"exit code {rc}"])[-1]

    def _publish(self, run: Run) -> str:
        """Hard-link (or copy, across file systems) the adapter into the adapters folder under a free name."""
        self.adapters.mkdir(parents=True, exist_ok=True)
        taken = [p.stem for p in self.adapters.iterdir()]
        for _ in range(1000):
            name = adapter_name(run.name, taken)
            target = self.adapters / f"{name}{SUFFIX}"
            try:
                _link_or_copy(run.final, target)
                break
            except (FileExistsError, ImgloraError):
                if not target.exists():
                    raise
                taken.append(name)  # someone took this name meanwhile
        else:
            raise ImgloraError("no free adapter name", "clean up the adapters folder", path=self.adapters)
        self.published += 1
        if self.on_publish is not None:
            self.on_publish()
        return name


def _link_or_copy(src: Path, target: Path) -> None:
    """A hard link (no space, instant; the trainer replaces files by rename, so the link keeps this version),
    or an atomic copy where links are not possible; neither ever replaces an existing file."""
    try:
        os.link(src, target)
    except FileExistsError:
        raise
    except OSError:  # another file system, or links not allowed
        with open(src, "rb") as f:
            atomic_write(target, lambda out: shutil.copyfileobj(f, out))
