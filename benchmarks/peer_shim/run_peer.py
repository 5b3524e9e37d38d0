"""Run a diffusers example training script where torchvision cannot be imported (benchmark use only).

PyPI's torchvision does not import beside the CPU torch this project pins. The scripts use only a
few PIL-based transforms, so this wrapper imports the libraries first (so that transformers sees no
torchvision and never reaches for it), then registers tv_transforms as `torchvision.transforms` and
runs the script unchanged:  python run_peer.py SCRIPT ARGS...
"""

import runpy
import sys
import types
from pathlib import Path

import datasets  # noqa: F401
import diffusers  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tv_transforms  # noqa: E402

torchvision = types.ModuleType("torchvision")
torchvision.transforms = tv_transforms
sys.modules["torchvision"] = torchvision
sys.modules["torchvision.transforms"] = tv_transforms
sys.modules["torchvision.transforms.functional"] = tv_transforms  # for its crop()
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
