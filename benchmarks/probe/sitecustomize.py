"""Loaded at start-up of every benchmarked process (ours and the peer's) through PYTHONPATH.

At exit it writes the process's peak memory to $IMGLORA_PROBE_OUT: CPU peak RSS and, if CUDA was
used, torch.cuda.max_memory_allocated: the same measurement for both sides.
"""

import atexit
import json
import os
import resource
import sys


def _report():
    out = os.environ.get("IMGLORA_PROBE_OUT")
    if not out:
        return
    data = {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        data["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(out, "a") as f:
        f.write(json.dumps(data) + "\n")


atexit.register(_report)
