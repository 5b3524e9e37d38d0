"""Helpers every test folder shares (imported as `helpers`: pytest puts tests/ on the path for conftest.py)."""

import copy
import hashlib
import os

import torch

from imglora.lora.adapters import Adapters
from imglora.lora.state import Adapter


def random_adapters(pipe, preset="cross-attn", text_encoder=False, rank=4, alpha=2.0, seed=0, scale=1.0,
                    name="x", **create) -> Adapters:
    """Adapters on `pipe` holding one adapter whose A and B are random: B = 0, as training starts, would make
    every comparison trivially equal (peft's set_init_weights_false)."""
    adapters = Adapters(pipe)
    params = adapters.create(name, adapters.targets(preset, text_encoder=text_encoder), rank=rank, alpha=alpha,
                             **create)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = torch.randn(p.shape, generator=g) * scale
    return adapters


def random_adapter(pipe, preset="cross-attn", text_encoder=False, arch="sd1", **kw) -> Adapter:
    """random_adapters on a copy of `pipe`, exported (float32, CPU), for files."""
    adapters = random_adapters(copy.deepcopy(pipe), preset, text_encoder, **kw)
    adapter = adapters.export(adapters.names[0])
    adapter.arch = arch
    return adapter


TRAIN_FLAGS = dict(resolution=32, bucket_step=16, rank=4, batch_size=4, lr=3e-3, save_precision="fp32", workers=1)


def train_flags(**overrides) -> list[str]:
    """`imglora train` flags for tiny, fast runs; an override of None leaves that flag out."""
    flags = []
    for key, value in {**TRAIN_FLAGS, **overrides}.items():
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def tree_hash(root) -> str:
    """Names, modes, times and bytes of everything under root (links by their target)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p}|{st.st_mode}|{st.st_mtime_ns}".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()
