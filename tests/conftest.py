"""Shared fixtures: tiny SD1/SD2/SDXL pipelines built from configs in-process, never downloaded."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
# One thread: the models here are tiny, and on a busy 2-core machine two threads spin against each
# other (20x slower). Subprocesses inherit it through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_BUILT = {}


@pytest.fixture(scope="session")
def pipes_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipes")


@pytest.fixture
def make_pipe(pipes_dir):
    """make_pipe("sd1" | "sd2" | "sdxl") -> a fresh pipeline (same random weights every time)."""
    from imglora.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    def make(kind: str = "sd1"):
        if kind not in _BUILT:
            if kind == "sdxl":
                _BUILT[kind] = tiny_sdxl_pipeline(pipes_dir / kind)
            else:
                _BUILT[kind] = tiny_sd_pipeline(pipes_dir / kind, v_prediction=kind == "sd2", linear_proj=kind == "sd2")
        return copy.deepcopy(_BUILT[kind])

    return make
