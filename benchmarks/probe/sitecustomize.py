"""Loaded at start-up of every benchmarked process (ours and the peer's) through PYTHONPATH.

At exit it writes the process's peak memory to $IMGLORA_PROBE_OUT: CPU peak RSS and, if CUDA was
used, torch.cuda.max_memory_allocated. It also records the time of every optimizer step (a global
torch hook), so steady-state step time is measured the same way for both sides. Both trainers read
the loss every step, which synchronises the GPU, so step times are real. At each step it also reads
the anonymous part of the RSS (Linux): peak RSS counts the pages of memory-mapped weight files, which
the kernel can drop under pressure; the anonymous part is what the process cannot give back.
"""

import atexit
import json
import os
import resource
import time

_steps: list[float] = []
_anon_mb = [0.0]


def _on_step(*_):
    _steps.append(time.perf_counter())
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        _anon_mb[0] = max(_anon_mb[0], kb / 1024)
    except (OSError, StopIteration):
        pass


if os.environ.get("IMGLORA_PROBE_OUT"):
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_on_step)


def _report():
    out = os.environ.get("IMGLORA_PROBE_OUT")
    if not out:
        return
    data = {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_times": _steps,
            "step_anon_mb": _anon_mb[0]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        data["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(out, "a") as f:
        f.write(json.dumps(data) + "\n")


atexit.register(_report)
