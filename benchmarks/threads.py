"""CPU threads: which OpenMP setting keeps imglora fast when the machine is also busy with other work.

    python -m benchmarks.threads                 # every setting x idle / loaded / two at once
    python -m benchmarks.threads --workload gen --reps 3

Each measurement is a fresh process (OpenMP reads its settings when torch loads) that times a fixed
piece of work on the embedded model after a warm-up: `gen` is three 20-step generations of 16 images,
`train` 20 training steps at batch 16 (the demo's recipe). Settings:

- default:  torch as installed: one thread per CPU, libgomp's default spin-wait
- passive:  OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once)
- spin1000: GOMP_SPINCOUNT=1000 (a short spin, then sleep)
- one:      a single thread
- imglora:  what `imglora.threads.configure()` chooses (the CLI's default)

Conditions: idle; loaded (as many busy-looping processes as CPUs: other work on the machine); pair
(two copies of the same work at once, as the app beside a training run). Times are ratios to the
default setting on the idle machine, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin1000": {"GOMP_SPINCOUNT": "1000"},
    "one": {"OMP_NUM_THREADS": "1"},
    "imglora": {"BENCH_IMGLORA_THREADS": "1"},
}


def worker(workload: str, data: str) -> None:
    """Runs in the measured process: print the seconds the work took."""
    if os.environ.get("BENCH_IMGLORA_THREADS"):
        from imglora.threads import configure

        configure(None)
    import torch

    if workload == "gen":
        from imglora.generate import GenerateArgs, generate
        from imglora.pipeline import load_model

        model = load_model(None)
        args = GenerateArgs("a red circle on a white background", steps=20, batch=16)
        generate(model, GenerateArgs(args.prompt, steps=2, batch=16))  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            generate(model, args)
    else:
        from imglora.config import TrainConfig
        from imglora.synthetic.demo import RECIPE
        from imglora.train.loop import Trainer

        out = tempfile.mkdtemp()
        cfg = TrainConfig(data=data, output=out, **{**RECIPE, "steps": 25})
        cfg.check()
        trainer = Trainer(cfg)
        for _ in range(5):  # warm-up
            trainer.train_step()
        t = time.perf_counter()
        for _ in range(20):
            trainer.train_step()
    print(json.dumps({"seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}))


def spawn(workload: str, data: str, setting: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(SETTINGS[setting], HF_HUB_OFFLINE="1", PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.threads", "--worker", workload, "--data", data],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def result(p: subprocess.Popen, timeout: float) -> float:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return float("inf")
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(workload: str, data: str, settings: list[str], reps: int, timeout: float) -> dict:
    cpus = len(os.sched_getaffinity(0))
    times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in settings} for c in ("idle", "loaded", "pair")}
    for _ in range(reps):
        for s in settings:  # alternating, so drift on a shared machine hits every setting alike
            times["idle"][s].append(result(spawn(workload, data, s), timeout))
            load = busy_loops(cpus)
            try:
                times["loaded"][s].append(result(spawn(workload, data, s), timeout))
            finally:
                for p in load:
                    p.kill()
            a, b = spawn(workload, data, s), spawn(workload, data, s)
            times["pair"][s].append(max(result(a, timeout), result(b, timeout)))
    base = statistics.median(times["idle"]["default"])
    return {"workload": workload, "cpus": cpus, "reps": reps, "default_idle_seconds": round(base, 2),
            "ratio_to_default_idle": {c: {s: round(statistics.median(v) / base, 2) for s, v in row.items()}
                                      for c, row in times.items()},
            "seconds": {c: {s: [round(x, 2) for x in v] for s, v in row.items()} for c, row in times.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="gen,train", help="gen, train, or both (comma-separated)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as inf")
    p.add_argument("--out", default=str(HERE / "results" / "cpu-threads.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.data)
    from imglora.synthetic.shapes import synth_shapes

    data = Path(tempfile.mkdtemp()) / "data"
    synth_shapes(data, 32, seed=0, size=64)
    results = [measure(w, str(data), a.settings.split(","), a.reps, a.timeout) for w in a.workload.split(",")]
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"{r['workload']}: default on an idle machine {r['default_idle_seconds']} s; ratios to it:")
        for c, row in r["ratio_to_default_idle"].items():
            print(f"  {c:7s} " + "  ".join(f"{s}={v}" for s, v in row.items()))


if __name__ == "__main__":
    main()
