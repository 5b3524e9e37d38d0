"""The benchmark harness: one command, a JSON result and a markdown table.

    python -m benchmarks.run --suite inference --model sd15 --size 256
    python -m benchmarks.run --suite control --model sd15 --size 256
    python -m benchmarks.run --suite training --model tiny --diffusers-script PATH
    python -m benchmarks.run --suite training --model sd15 --steps 10 --variants no-cache,checkpointing,int8
    python -m benchmarks.run --suite scaling --model tiny --size 128
    python -m benchmarks.run --suite all --device cuda --model sd15 --size 512 --dtype bf16

Ratios are measured in the same run, alternating the configurations, medians of >= 3 repetitions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

SUITES = ("inference", "control", "training", "scaling", "data")


def model_path(name: str) -> str:
    """The diffusers folder behind --model: the embedded model, a cached random-weight build, or a path."""
    if name in ("sd15", "sdxl"):
        from .models import build

        return str(build(name))
    from imglora.models.load import resolve_model

    return str(resolve_model(None if name == "tiny" else name))


def markdown(results: dict) -> str:
    lines = ["| suite | metric | value |", "|---|---|---|"]
    for suite, values in results.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if isinstance(v, float):
                v = f"{v:.3f}"
            lines.append(f"| {suite} | {k} | {v} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="inference", help=f"comma-separated: {', '.join(SUITES)}, or all")
    p.add_argument("--model", default="sd15", help="tiny (the embedded model), sd15, sdxl, or a diffusers folder")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="training steps per run (training suite)")
    p.add_argument("--diffusers-script", help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    p.add_argument("--ours-python", help="the Python of a venv with only imglora's own requirements (no peft, "
                   "torchao or datasets, which diffusers imports at start-up when they are installed); "
                   "default: this one, shared with the script")
    p.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help="also run ours with: no-cache (encode every step), checkpointing, compile, int8, fp8 "
                   "(comma-separated)")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--scale-sizes", type=ints, default=[], help="scaling suite: sizes at --batch (default: "
                   "half, once and twice --size)")
    p.add_argument("--scale-batches", type=ints, default=[1, 2, 4, 8], help="scaling suite: batches at --size")
    p.add_argument("--data-sizes", type=ints, default=[100, 1000, 10000], help="data suite: folder sizes")
    p.add_argument("--no-peft", action="store_true", help="skip the diffusers+peft inference comparison")
    p.add_argument("--out", default="benchmark-results.json")
    args = p.parse_args(argv)
    from .training import VARIANTS

    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    args.scale_sizes = args.scale_sizes or [args.size // 2, args.size, args.size * 2]
    suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    results = {"meta": {"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__,
                        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or
                        platform.machine(), "threads": torch.get_num_threads(), "args": vars(args)}}
    path = model_path(args.model)
    if "inference" in suites:
        from imglora.models.load import load_pipeline

        from .inference import bench_inference, bench_mixed

        pipe = load_pipeline(path)
        results["inference"] = bench_inference(pipe.unet, device, dtype, args.size, args.batch, reps=args.reps,
                                               with_peft=not args.no_peft, log=lambda s: print(s, file=sys.stderr))
        results["inference"].update(bench_mixed(pipe.unet, device, dtype, args.size, reps=args.reps,
                                                log=lambda s: print(s, file=sys.stderr)))
        del pipe
    if "control" in suites:
        from imglora.models.load import load_pipeline

        from .inference import bench_control

        pipe = load_pipeline(path)
        results["control"] = bench_control(pipe.unet, device, dtype, args.size, reps=args.reps,
                                           log=lambda s: print(s, file=sys.stderr))
        del pipe
    if "training" in suites:
        from .training import bench_training

        results["training"] = bench_training(path, args)
    if "scaling" in suites:
        from .training import bench_scaling

        results["scaling"] = bench_scaling(path, args)
    if "data" in suites:
        from .data import bench_data

        results["data"] = bench_data(path, args)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
