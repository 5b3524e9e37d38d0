"""Helpers shared by the ui tests."""

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

SETTINGS = dict(steps=2, guidance=3.0, width=32, height=32)  # tiny and fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path_or_image):
    import numpy as np
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB")).astype(int)


def same_image(a, b, tol: int = 1) -> bool:
    """Equal up to 8-bit rounding of float noise."""
    return int(abs(pixels(a) - pixels(b)).max()) <= tol


def in_folder(path: str, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(folder)


def http_status(url: str) -> int:
    """The HTTP status of a GET, errors included."""
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
