"""The server-side state shared by every user: one pipeline, one lock, the adapters folder, the outputs.

A user's blend is theirs (a `gr.State` dict, see `blend.py`); the pipeline is shared. A generation
takes its turn on the pipeline, loads any adapter it needs that is not loaded yet, sets every loaded
adapter's weight from its own blend, and runs. Adapters stay loaded, so a new weight costs nothing but a
number; no other request can change the weights until the turn ends (RELIABILITY.md §3, U5).

Turns are fair between users (round robin, `Turns`), and one request is bounded (`Limits`): its size,
steps and images are checked before it waits, and a generation still running after `Limits.seconds` is
stopped at the next step, as is one its user interrupts (`Job`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imglora.errors import ImgloraError
from imglora.formats.files import clean_temp_files
from imglora.generate import save_png
from imglora.formats.embeddings import read_bundled
from imglora.formats.lora_file import load_adapter_shapes
from imglora.lora.adapters import AdapterError, Adapters
from imglora.lora.state import Blend
from imglora.pipeline import Model, attach, load_model
from imglora.train.embeddings import remove_tokens

from .catalogue import Catalogue, fingerprint

SCHEDULERS = {  # label -> (diffusers class, extra config)
    "model default": (None, {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


class NonFinite(ImgloraError):
    """NaN or Inf in the model's output (RELIABILITY.md U6): a message, never a black image."""


class Stopped(ImgloraError):
    """A generation interrupted by its user, or stopped at the time limit."""


@dataclass
class Limits:
    """What one request may ask for, so that no request holds the shared pipeline for minutes."""
    steps: int = 100
    side: int = 1536  # pixels, width and height
    images: int = 8  # batch size
    megapixels: float = 8.0  # all images of one batch (a grid's cells included)
    seconds: float = 120.0  # a generation still running after this is stopped
    waiting: int = 4  # requests one user may have waiting for the pipeline

    def text(self) -> str:
        return (f"Limits per request: at most {self.steps} steps, {self.side} px a side, {self.images} images and "
                f"{self.megapixels:g} megapixels in one batch; a generation still running after {self.seconds:g} s "
                f"is stopped. Users take turns on the model (round robin); each may have {self.waiting} requests "
                "waiting.")


class Job:
    """One request for the pipeline: whose it is (for turns and Interrupt), how far it got, and whether it
    should stop. report(text, done, total) shows progress in the page; steps is set by the caller."""

    def __init__(self, user: str = "local", report=None):
        self.user = user
        self.report = report or (lambda text, done, total: None)
        self.steps: int | None = None
        self.stop = threading.Event()

    def check(self, where: str) -> None:
        if self.stop.is_set():
            raise Stopped(f"interrupted {where}", "nothing was saved")


class Turns:
    """The pipeline's lock, fair between users: when it is free, the waiting user whose last turn is the
    oldest goes next (round robin), so one user's pile of requests cannot push everyone else back.
    Gradio's own queue is first come, first served."""

    def __init__(self, per_user: int = 4):
        self.per_user = per_user
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: list[tuple[int, Job]] = []  # (ticket, job), oldest first
        self._running: Job | None = None
        self._last: dict[str, int] = {}  # user -> number of their last turn
        self._tickets, self._turns = itertools.count(), itertools.count(1)

    def _order(self) -> list[tuple[int, Job]]:
        return sorted(self._waiting, key=lambda w: (self._last.get(w[1].user, 0), w[0]))

    @contextlib.contextmanager
    def turn(self, job: Job):
        with self._cond:
            if sum(j.user == job.user for _, j in self._waiting) >= self.per_user:
                raise ImgloraError(f"you already have {self.per_user} requests waiting for the model",
                                   "wait for them to finish, or press Interrupt")
            mine = (next(self._tickets), job)
            self._waiting.append(mine)
            try:
                while self._busy or self._order()[0] is not mine:
                    job.check("while waiting for its turn")
                    ahead = self._order().index(mine) + 1
                    job.report(f"waiting for the model: {ahead} request{'s' * (ahead > 1)} ahead", 0, None)
                    self._cond.wait(0.5)
            finally:
                self._waiting.remove(mine)
                self._cond.notify_all()
            self._busy, self._running = True, job
            self._last[job.user] = next(self._turns)
        try:
            yield
        finally:
            with self._cond:
                self._busy, self._running = False, None
                self._cond.notify_all()

    def interrupt(self, user: str) -> int:
        """Stop `user`'s running request at its next step and drop their waiting ones; returns how many."""
        with self._cond:
            jobs = [j for _, j in self._waiting] + [self._running]
            hit = [j for j in jobs if j is not None and j.user == user]
            for j in hit:
                j.stop.set()
            self._cond.notify_all()
        return len(hit)


class TokenInUse(ImgloraError):
    """Two adapters of one blend bring the same textual-inversion token."""


def open_model(model, device: str = "cpu", config=None) -> Model:
    """load_model (config: the diffusers folder a single-file model needs), with a missing embedded default
    model turned into a message."""
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return load_model(model, device=device, dtype=dtype, config=config)
    except ImportError:
        if model is not None:
            raise
        raise ImgloraError("no --model given and the embedded default model is not installed",
                           "pass --model PATH (a diffusers folder)") from None


class Session:
    def __init__(self, model: Model, adapters_dir, outputs_dir="outputs", uploads_enabled: bool = True,
                 max_upload_mb: int = 512, max_grid: int = 64, limits: Limits | None = None):
        self.model = model
        self.pipe = model.pipe
        self.arch = model.arch
        self.adapters = Adapters(model.pipe)
        self.limits = limits or Limits()
        self.turns = Turns(self.limits.waiting)
        self.catalogue = Catalogue(adapters_dir, self.arch, misfit=self._misfit)
        self.catalogue.folder.mkdir(parents=True, exist_ok=True)
        clean_temp_files(self.catalogue.folder)  # uploads a killed server left half-validated
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.uploads_enabled = uploads_enabled
        self.max_upload_bytes = int(max_upload_mb) * 1024 * 1024
        self.max_grid = max_grid
        self.loaded: dict[str, tuple] = {}  # name -> (path, fingerprint) of what is on the pipeline
        self.tokens: dict[str, list[str]] = {}  # name -> the textual-inversion tokens its file brought (attach)
        self.merged_blend: tuple | None = None  # Blend.key() of the blend folded into the weights, in merge mode
        self._default_scheduler = model.pipe.scheduler
        self._save_lock = threading.Lock()
        self.catalogue.scan()

    # -- the pipeline, under the lock ---------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, blend: Blend, merge: bool = False, scheduler: str = "model default", sample_rows: bool = False,
              pins: dict | None = None, job: Job | None = None):
        """Hold the model with exactly `blend` active; all other adapters off.

        merge: fold the blend into the base weights (faster steps; re-merged only when the blend changes).
        sample_rows: leave it unmerged, for per-image blends (comparison grids).
        pins: {name: Entry.version} the user enabled; checked again once the turn has come, as a rescan
        may have given a name to another file meanwhile.
        job: whose turn this is; its steps are reported, and it stops when interrupted or over the time limit.
        """
        job = job or Job()
        with self.turns.turn(job):
            for name, version in (pins or {}).items():
                self.catalogue.get(name, version)
            self._drop_gone()
            for name in blend.weights:
                self._ensure_loaded(name, blend.weights)
            self._set_blend(blend, merge and not sample_rows)
            self.pipe.scheduler = self._scheduler(scheduler)
            watch = _NonFiniteWatch(self.pipe)
            steps = _StepWatch(self.pipe, job, self.limits.seconds)
            try:
                yield self.model
                watch.check()
            finally:
                steps.remove()
                watch.remove()
                self.pipe.scheduler = self._default_scheduler

    def _misfit(self, path) -> str | None:
        """Why a file's modules do not fit this model, from its header (the catalogue lists the reason)."""
        try:
            self.adapters.check(load_adapter_shapes(path, self.model.layers_per_block))
        except AdapterError as e:
            return str(e)
        return None

    def _ensure_loaded(self, name: str, wanted=()) -> None:
        """Load `name` if it is not (or its file changed); `wanted`: the names of the blend it is loaded for."""
        entry = self.catalogue.get(name)
        if self.loaded.get(name) == (entry.path, entry.fingerprint):
            return
        self.unmerge()
        if name in self.adapters.names:  # the file changed since it was loaded
            self._unload(name)
        try:
            if fingerprint(entry.path) != entry.fingerprint:
                raise ImgloraError("the file changed on disk since the folder was listed",
                                   "press Refresh, then enable the adapter again")
            self.catalogue.card(name)  # the strict full read: NaN, keys, arch (cached per file version)
            tokens = list(read_bundled(entry.path))
            self._free_tokens(name, tokens, wanted)
            attach(self.model, self.adapters, entry.path, weight=0.0, name=name)  # its embeddings too
            self.tokens[name] = tokens
        except OSError:
            raise ImgloraError(f"adapter {name!r} has left the folder", "press Refresh") from None
        except TokenInUse:
            raise  # the file is fine; only this blend cannot have both
        except ImgloraError as e:
            if entry.error is None:
                self.catalogue.mark_broken(entry, e)
            raise ImgloraError(f"adapter {name!r} cannot be used: {entry.error}", "", path=entry.path.name) from None
        self.loaded[name] = (entry.path, entry.fingerprint)

    def _free_tokens(self, name: str, tokens: list[str], wanted) -> None:
        """A token is on the model for one file at a time (two runs that both trained "zorbly"): an adapter
        outside the blend that holds one of these tokens is unloaded; one in the blend is an error."""
        for other, theirs in list(self.tokens.items()):
            shared = sorted(set(tokens) & set(theirs))
            if other == name or not shared:
                continue
            if other in wanted:
                raise TokenInUse(f"adapters {other!r} and {name!r} both bring the token {shared[0]!r}",
                                 "enable one of them at a time")
            self.unmerge()
            self._unload(other)

    def _drop_gone(self) -> None:
        """Unload adapters whose file has left the folder (they hold memory, and nobody can ask for them)."""
        for name in [n for n in self.loaded if n not in self.catalogue.entries]:
            self.unmerge()
            self._unload(name)

    def _unload(self, name: str) -> None:
        """Take an adapter off the pipeline, with the tokens its file brought."""
        self.adapters.remove(name)
        remove_tokens(self.pipe, self.tokens.pop(name, []))
        self.loaded.pop(name, None)

    def _set_blend(self, blend: Blend, merge: bool) -> None:
        # A schedule changes weights between steps, so it stays at run time (generate applies it per step).
        merge = merge and not blend.scheduled
        key = blend.key()  # weights, block weights and all: two blends with one key set every layer alike
        if merge and self.merged_blend == key:
            return  # already folded in: no per-step cost, nothing to redo
        self.unmerge()
        self.adapters.apply(blend)
        if merge:
            self.adapters.merge()
            self.merged_blend = key

    def unmerge(self) -> None:
        """Back to the exact base weights (the adapters stay loaded)."""
        if self.adapters.merged:
            self.adapters.unmerge()
        self.merged_blend = None

    def _scheduler(self, label: str):
        if label not in SCHEDULERS:
            raise ImgloraError(f"unknown scheduler {label!r}", f"choose one of {', '.join(SCHEDULERS)}")
        cls_name, extra = SCHEDULERS[label]
        if cls_name is None:
            return self._default_scheduler
        import diffusers

        return getattr(diffusers, cls_name).from_config(self._default_scheduler.config, **extra)

    # -- outputs ---------------------------------------------------------------------------------------
    @staticmethod
    def shown(path) -> str:
        """A copy of an output in Gradio's cache, which is what the page is served from: the outputs folder
        itself is never served, so a broad --outputs (a home folder) exposes no file the app did not write."""
        from gradio import processing_utils, utils

        return processing_utils.save_file_to_cache(path, utils.get_upload_folder())

    def save_image(self, image, parameters: str, prefix: str = "imglora") -> Path:
        """Save into the outputs folder under the next free number; atomic and never overwriting."""
        with self._save_lock:
            self.outputs.mkdir(parents=True, exist_ok=True)
            pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.png$")
            numbers = [int(m.group(1)) for n in os.listdir(self.outputs) if (m := pattern.match(n))]
            k = max(numbers, default=-1) + 1
            while True:
                try:
                    return save_png(image, self.outputs / f"{prefix}-{k:05d}.png", parameters)
                except ImgloraError:
                    if not (self.outputs / f"{prefix}-{k:05d}.png").exists():
                        raise
                    k += 1  # another process took this number meanwhile


class _StepWatch:
    """A pre-hook on the UNet (one call per denoising step): reports the step and the time left, and stops
    the run when its job is interrupted, when it runs past `seconds`, or when its pace says it would."""

    def __init__(self, pipe, job: Job, seconds: float):
        self.job, self.seconds, self.done = job, seconds, 0
        self.start = self.first = time.monotonic()
        unet = getattr(pipe, "unet", None)
        self.handle = unet.register_forward_pre_hook(self._step) if unet is not None else None

    def _step(self, module, args):
        job, total, done, now = self.job, self.job.steps, self.done, time.monotonic()
        job.check(f"at step {done + 1}" + (f" of {total}" if total else ""))
        if done == 0:
            self.first = now  # the pace is measured from the first step (text encoding and warm-up excluded)
        elapsed = now - self.start
        left = (now - self.first) / done * (total - done) if done and total else None
        label = f"step {done + 1}" + (f"/{total}" if total else "")
        # Two steps give the pace; a request that would end past the limit stops now, not at the limit.
        needed = elapsed + (left or 0)
        if elapsed > self.seconds or (left is not None and done >= 2 and needed > self.seconds):
            raise Stopped(f"stopped at {label}: this request needs about {needed:.0f} s, over the limit of "
                          f"{self.seconds:g} s", "use fewer steps or images, or a smaller size")
        job.report(label + (f", about {left:.0f} s left" if left is not None else ""), done, total)
        self.done += 1

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class _NonFiniteWatch:
    """Forward hooks on the UNet and VAE decoder that note NaN/Inf outputs during a generation."""

    def __init__(self, pipe):
        self.where: str | None = None
        self.handles = []
        for label, module in (("UNet", getattr(pipe, "unet", None)), ("VAE decoder", getattr(getattr(pipe, "vae", None),
                                                                                               "decoder", None))):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._hook(label)))

    def _hook(self, label):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            if self.where is None and torch.is_tensor(t) and not torch.isfinite(t).all():
                self.where = label
        return hook

    def check(self) -> None:
        if self.where:
            raise NonFinite(f"the {self.where} produced NaN or Inf values, so the image would be black",
                            "lower the adapter weights, or run in fp32 (nothing was saved)")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
