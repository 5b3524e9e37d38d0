"""Helpers shared by the imglora-data tests (imported by name: the test folders have no __init__.py)."""

import hashlib
import os
import random

from datasets_tools.cli import main


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


def shape(colour="red", size=(128, 128), seed=0):
    """A distinct picture per seed: different shapes, positions and backgrounds."""
    from imglora.data.synth import BASE_SHAPES, NEW_SHAPES, render

    kinds = BASE_SHAPES + NEW_SHAPES
    bg = ("white", "black", "gray")[seed % 3]
    return render(kinds[seed % len(kinds)], colour, bg, max(size), random.Random(seed)).resize(size)


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code
