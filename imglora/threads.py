"""CPU threads for torch, chosen when a command starts, before torch loads (OpenMP reads its settings then).

Measured by benchmarks/threads.py on the embedded model (2 CPUs; results/cpu-threads.json): with
torch's defaults (a thread per CPU, libgomp's long spin-wait) a generation ran 7x and a training step
4x slower while the CPUs were busy with other work, because the threads spin on CPUs the other work
needs. One thread per CPU left free ran at 1-2x instead. So imglora starts as many threads as the
CPUs it may use that other work is not using right now (at least one), and caps the spin-wait so that
work arriving later (the app beside a training run) is slowed less (2.5-3.7x instead of 4.5x).
`--threads N` or OMP_NUM_THREADS decide instead; OMP_WAIT_POLICY or GOMP_SPINCOUNT replace the cap.
"""

from __future__ import annotations

import os
import statistics
import time

SPIN = "1000"  # libgomp spins this many times waiting for its other threads, then sleeps


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cpus() -> int:
    """CPUs other processes keep busy now: the runnable tasks besides this one (Linux's /proc/loadavg,
    the median of 5 looks over 0.1 s; the load average itself lags a minute behind)."""
    looks = []
    for i in range(5):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        looks.append(running - 1)
        if i < 4:
            time.sleep(0.025)
    return max(0, int(statistics.median(looks)))


def choose(threads: int | None = None) -> int:
    """`threads`, else OMP_NUM_THREADS, else the available CPUs not busy with other work (at least 1)."""
    if threads:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cpus = available_cpus()
    return max(1, cpus - min(cpus, busy_cpus()))


def configure(threads: int | None = None) -> int:
    """Cap the spin-wait (unless the environment sets a policy) and set torch's thread count."""
    if not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["GOMP_SPINCOUNT"] = SPIN
    n = choose(threads)
    import torch

    torch.set_num_threads(n)
    return n
