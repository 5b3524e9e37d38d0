"""Loaded at start-up of every benchmarked process (ours and the peer's) through PYTHONPATH.

At exit it writes the process's peak memory to $IMGLORA_PROBE_OUT: CPU peak RSS and, if CUDA was
used, torch.cuda.max_memory_allocated. It also records the time of every optimizer step (a global
torch hook), so steady-state step time is measured the same way for both sides. Both trainers read
the loss every step, which synchronises the GPU, so step times are real.
"""

import atexit
import json
import os
import resource
import time

_steps: list[float] = []

if os.environ.get("IMGLORA_PROBE_OUT"):
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: _steps.append(time.perf_counter()))


def _report():
    out = os.environ.get("IMGLORA_PROBE_OUT")
    if not out:
        return
    data = {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_times": _steps}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        data["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(out, "a") as f:
        f.write(json.dumps(data) + "\n")


atexit.register(_report)
