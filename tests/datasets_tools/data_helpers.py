"""Helpers shared by the imglora-data tests (imported by name: the test folders have no __init__.py)."""

import random

from helpers import tree_hash  # noqa: F401  (re-exported for the tests here)

from datasets_tools.cli import main


def shape(colour="red", size=(128, 128), seed=0):
    """A distinct picture per seed: different shapes, positions and backgrounds."""
    from imglora.synthetic.shapes import BASE_SHAPES, NEW_SHAPES, render

    kinds = BASE_SHAPES + NEW_SHAPES
    bg = ("white", "black", "gray")[seed % 3]
    return render(kinds[seed % len(kinds)], colour, bg, max(size), random.Random(seed)).resize(size)


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code
