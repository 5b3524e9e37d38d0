"""Strict safetensors reading and atomic writing of every file imglora produces.

safetensors' own errors are accurate but cryptic ("header too large" for a Git LFS pointer), so the
header is checked here first and every failure becomes one line naming the file (RELIABILITY.md §1, F1-F5).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ImgloraError

MAX_HEADER = 100_000_000  # safetensors' own cap
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# safetensors dtype names -> torch dtypes (torch 2.3+ has every one of them)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                      "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
TMP_MARK = ".imglora-tmp-"


def _reject(path, what, fix="check that this is a .safetensors file and that it was copied completely"):
    raise ImgloraError(what, fix, path=path)


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Validate the header and layout without reading tensor data; returns (tensors, metadata, data_start)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block until someone writes to it
            _reject(path, "not a regular file (a folder, FIFO or device)", "pass the .safetensors file itself")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                _reject(path, "empty file (0 bytes)")
            if size < 8:
                _reject(path, f"incomplete safetensors (expected at least 8 bytes, found {size})")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                # Not a plausible header length: say what the file is, if we can tell (RELIABILITY.md F2).
                if head.startswith(b"version "):
                    _reject(path, "a Git LFS pointer, not the file itself", "run `git lfs pull` in its repository")
                if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                    _reject(path, "a PyTorch pickle, not safetensors",
                            "convert it to .safetensors with a trusted tool; pickles can run code and are not loaded")
                _reject(path, f"incomplete safetensors (header of {n} bytes, but the file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise ImgloraError(f"cannot read ({e.strerror})", "check the path and its permissions", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        _reject(path, f"malformed safetensors header ({e})")
    if not isinstance(header, dict):
        _reject(path, "malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _reject(path, "malformed safetensors metadata (values must be strings)")
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPE_SIZES:
                raise ValueError(f"unknown dtype {dtype}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(start, int) and isinstance(end, int)):
                raise ValueError("bad shape or offsets")
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            if end - start != nbytes or start < 0:
                raise ValueError(f"shape {shape} needs {nbytes} bytes but the offsets span {end - start}")
        except (KeyError, TypeError, ValueError) as e:
            _reject(path, f"malformed entry for tensor {key!r} ({e})")
        spans.append((start, end, key))
    spans.sort()
    position = 0
    for start, end, key in spans:
        if start != position:
            _reject(path, f"invalid offsets for tensor {key!r} (overlapping or with a gap)")
        position = end
    expected = 8 + n + position
    if expected != size:
        _reject(path, f"incomplete safetensors (expected {expected} bytes, found {size})")
    return header, metadata, 8 + n


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a validated file; NaN or Inf values are an error naming the tensor."""
    from safetensors.torch import load

    header, metadata, _ = read_header(path)
    try:
        tensors = load(Path(path).read_bytes())
    except Exception as e:  # the header checks above should leave nothing for safetensors to refuse
        _reject(path, f"unreadable safetensors ({e})")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            _reject(path, f"tensor {key!r} contains NaN or Inf values", "the adapter is broken: retrain or re-export it")
    return tensors, metadata


def _free_mb(directory: Path) -> float:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize / 1e6
    except OSError:
        return float("nan")


def atomic_write(path: str | os.PathLike, write: Callable, overwrite: bool = False, size_hint: int = 0) -> Path:
    """Write a file through `write(fileobj)` into a temp file beside it, then rename it into place.

    A crash leaves either the old file or the new one, never a partial file under the final name.
    Without `overwrite`, an existing file is an error and is never touched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ImgloraError("already exists", "choose another name or pass --overwrite", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a normal file is 0644 under the usual umask
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone created the file meanwhile
            os.unlink(tmp)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            need = max(size_hint, 1) / 1e6
            raise ImgloraError(f"disk full: need {need:.1f} MB in {path.parent}, {_free_mb(path.parent):.1f} MB free",
                               "free some space and run again", path=path) from None
        if isinstance(e, FileExistsError):
            raise ImgloraError("already exists", "choose another name or pass --overwrite", path=path) from None
        raise
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = False):
    """Yield a temp folder beside `final`; when the block ends without an error, fsync it and rename it to
    `final` (replacing an existing one only with `replace`; an empty one always). On an error, or a kill
    before the rename, `final` is untouched and the temp folder goes (clean_temp_files removes a killed one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        _fsync_dir(tmp)
        if final.is_dir() and (replace or not any(final.iterdir())):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def clean_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove temp files that a killed process left behind."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(f".*{TMP_MARK}*"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      overwrite: bool = False) -> Path:
    """Validate (finite values, string metadata) and write atomically."""
    from safetensors.torch import save

    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ImgloraError(f"refusing to write: tensor {key!r} contains NaN or Inf", "nothing was written", path=path)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite, size_hint=len(data))


def tensor_data_hash(data: bytes) -> str:
    """kohya's sshs_model_hash: sha256 of the bytes after the 8-byte length and the JSON header."""
    import hashlib

    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def dumps_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
