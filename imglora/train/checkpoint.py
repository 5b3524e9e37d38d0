"""Resumable checkpoints as safetensors + JSON (no pickle), written to a temp folder and renamed.

A checkpoint folder holds adapter.safetensors, optimizer.safetensors, (with --ema) ema.safetensors,
state.json and, written last, COMPLETE. `latest` is the newest folder with that marker that also loads;
older ones are deleted only after a new one is complete (RELIABILITY.md T1-T5, T10).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import ImgloraError
from ..formats.files import TMP_MARK, atomic_dir, read_safetensors, write_safetensors

MARKER = "COMPLETE"
STATE_KEYS = ("step", "identity", "schedule", "optimizer")  # what state.json must hold to resume


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for idx, entry in state["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                rest[f"{idx}/{k}"] = v
    return tensors, {"values": rest, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(info["values"].items()):
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(root: Path, step: int, adapter: dict[str, torch.Tensor], optimizer, state: dict,
                    keep_last: int, ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step-NNNNNNN/ atomically, then prune all but the newest `keep_last` complete ones. `ema`: the
    EMA of the adapter's tensors (same keys), if the run keeps one."""
    final = root / f"step-{step:07d}"
    # A checkpoint of the same step from an earlier, resumed run is replaced.
    with atomic_dir(final, replace=True) as tmp:
        write_safetensors(tmp / "adapter.safetensors", adapter)
        opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        if ema is not None:
            write_safetensors(tmp / "ema.safetensors", ema)
        state = dict(state, optimizer=opt_info, ema=ema is not None)
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        (tmp / MARKER).write_text(str(step))
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with their completion marker, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def clean_partial(root: Path) -> None:
    """Remove folders a killed save left behind."""
    if root.is_dir():
        for p in root.glob(f".step-*{TMP_MARK}*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, optimizer state dict, state) of one checkpoint; ImgloraError if anything is damaged.
    state["ema"] holds the EMA tensors of a run with --ema, else None."""
    if not (path / MARKER).is_file():
        raise ImgloraError("incomplete checkpoint (no COMPLETE marker)", "resume from another checkpoint", path=path)
    adapter, _ = read_safetensors(path / "adapter.safetensors")
    opt_tensors, _ = read_safetensors(path / "optimizer.safetensors")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["everything"]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        optimizer = _unflatten_optimizer(opt_tensors, state.pop("optimizer"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImgloraError(f"damaged state.json ({e})", "resume from another checkpoint", path=path) from None
    # Read here, not by the caller, so that a damaged EMA file makes `latest` fall back to an older checkpoint.
    state["ema"] = read_safetensors(path / "ema.safetensors")[0] if state.get("ema") else None
    return adapter, optimizer, state


def find_and_load(root: Path, spec: str, warn=print):
    """`latest`: the newest complete checkpoint that loads, falling back to older ones with a warning.
    Never a silent fresh start: no loadable checkpoint is an error."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise ImgloraError("no such checkpoint", "pass --resume latest or an existing step-NNNNNNN folder",
                               path=path)
        return path, *load_checkpoint(path)
    candidates = complete_checkpoints(root)
    if not candidates:
        raise ImgloraError("no complete checkpoint to resume from", "train without --resume, or check --output",
                           path=root)
    for path in reversed(candidates):
        try:
            return path, *load_checkpoint(path)
        except ImgloraError as e:
            warn(f"warning: skipping damaged checkpoint {e.line()}")
    raise ImgloraError("no checkpoint could be loaded (all are damaged)", "train again without --resume", path=root)
