"""`imglora ui` as a user starts it: a subprocess that prints its address and asks for the login it was given."""

import os
import re
import subprocess
import sys
import time

import pytest
from ui_helpers import free_port, http_status


@pytest.mark.slow
def test_imglora_ui_prints_its_loopback_address_and_requires_the_login(ui_files, tmp_path):
    from gradio_client import Client

    port = free_port()
    cmd = [sys.executable, "-m", "imglora.cli", "ui", "--model", str(ui_files["model"]), "--adapters",
           str(ui_files["adapters"]), "--port", str(port), "--auth", "me:secret"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        line = _wait_for_line(proc, "imglora ui: ", 120)
        url = re.search(r"http://\S+", line).group(0)
        assert url == f"http://127.0.0.1:{port}/" and "usable" in line
        assert http_status(url + "config") == 401  # nothing without the login
        with pytest.raises(Exception):
            Client(url, verbose=False)
        table = Client(url, auth=("me", "secret"), verbose=False).predict(api_name="/refresh")
        listed = {row[0]: row for row in table["data"]}
        assert listed["style_a"][1] == "ok" and "incomplete" in listed["broken"][1]
    finally:
        proc.terminate()
        proc.wait(30)
    assert (tmp_path / "outputs").exists() is False  # nothing generated, nothing written


def test_a_malformed_login_is_one_line_and_exit_code_2(ui_files, capsys):
    from imglora.cli import main

    assert main(["ui", "--model", str(ui_files["model"]), "--auth", "nopassword"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imglora: --auth must look like user:password") and "Traceback" not in err


def test_dependency_floors_are_declared_and_met():
    """RELIABILITY.md U7: the CVE floors (gradio, pillow, torch, safetensors) are in pyproject and installed."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.version import Version

    floors = {"gradio": "6.20", "pillow": "12.3", "torch": "2.10", "safetensors": "0.8"}
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, floor in floors.items():
        spec = next(d for d in deps if re.match(rf"{name}\b", d, re.IGNORECASE))
        declared = re.search(r">=\s*([\d.]+)", spec).group(1)
        assert Version(declared) >= Version(floor), spec
        assert Version(version(name)) >= Version(floor), name


def _wait_for_line(proc, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError("no address printed:\n" + "".join(seen[-20:]))
