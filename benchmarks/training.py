"""Training speed and memory: `imglora train` beside diffusers' train_text_to_image_lora.py and the limit.

Both run as fresh processes at equal settings (model, data, steps, batch, resolution, rank, targets
`attn`, no text encoder), alternating, median of the pairs. Peak memory comes from the same probe in
both processes (benchmarks/probe/sitecustomize.py). The limit is the frozen UNet's forward plus
backward to its input at the same shapes: the least work any LoRA step must do.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_data(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """The same synthetic images as sidecar captions (ours) and an imagefolder metadata.jsonl (the peer)."""
    from imglora.synthetic.shapes import synth_shapes

    ours, peer = root / "ours", root / "peer"
    if not ours.is_dir():
        written = synth_shapes(ours, n, seed=0, size=size)
        peer.mkdir(parents=True)
        with open(peer / "metadata.jsonl", "w") as f:
            for path, sample in written:
                os.link(path, peer / path.name)
                f.write(json.dumps({"file_name": path.name, "text": sample.caption}) + "\n")
    return ours, peer


def run(cmd: list[str], env_extra: dict, timeout: int = 3600) -> dict:
    """Wall time and peak memory of one process."""
    probe = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    env = dict(os.environ, HF_HUB_OFFLINE="1", IMGLORA_PROBE_OUT=probe, PYTHONUNBUFFERED="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE / "probe"), env_extra.get("PYTHONPATH", ""),
                                                    str(HERE.parent), os.environ.get("PYTHONPATH", "")] if p)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(probe).read_text().splitlines()]
    os.unlink(probe)
    peak = max(rows, key=lambda d: d["maxrss_mb"])
    times = max((r["step_times"] for r in rows), key=len)
    # Steady state: the median interval between optimizer steps over the second half of the run.
    gaps = [b - a for a, b in zip(times[len(times) // 2:], times[len(times) // 2 + 1:])]
    step = statistics.median(gaps) if gaps else float("nan")
    return {"wall_s": wall, "step_s": step, **{k: v for k, v in peak.items() if k != "step_times"}}


# Our trainer's other configurations, each run beside the default (latents and text cached) in the same pairs.
VARIANTS = {
    "no-cache": ["--cache-latents", "none", "--no-cache-text"],  # encode every step, as the script does
    "checkpointing": ["--gradient-checkpointing"],
    "compile": ["--compile"],  # its steady state is the second half of the steps: give it enough of them
    "int8": ["--quantize-base", "int8"],
    "fp8": ["--quantize-base", "fp8"],
}


def ours_cmd(model, data, out, steps, batch, size, rank, args, extra=()) -> list[str]:
    cmd = [args.ours_python or sys.executable, "-m", "imglora.cli", "train", "--data", str(data), "--output", str(out),
           "--steps", str(steps), "--batch-size", str(batch), "--resolution", str(size), "--rank", str(rank), "--alpha",
           str(rank), "--lr", "1e-4", "--targets", "attn", "--seed", "0", "--overwrite", "--save-precision", "fp32",
           "--bucket-step", str(min(64, size)), "--mixed-precision", {"fp32": "no"}.get(args.dtype, args.dtype)]
    cmd += ["--model", str(model), *extra]
    if args.device == "cuda":
        cmd += ["--device", "cuda"]
    return cmd


def peer_cmd(script, model, data, out, steps, batch, size, rank, args) -> list[str]:
    # Where torchvision does not import, the wrapper stands in for its few PIL transforms.
    launcher = [] if _torchvision_works() else [str(HERE / "peer_shim" / "run_peer.py")]
    return [sys.executable, *launcher, str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_column", "text", "--resolution", str(size), "--center_crop", "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--rank", str(rank), "--learning_rate", "1e-4", "--lr_scheduler",
            "constant", "--seed", "0", "--output_dir", str(out), "--checkpointing_steps", "1000000",
            "--dataloader_num_workers", "0", "--mixed_precision", {"fp32": "no"}.get(args.dtype, args.dtype),
            "--report_to", "tensorboard"]


def limit_seconds(model, size: int, batch: int, device, dtype, reps: int = 3) -> tuple[float, int]:
    """Frozen UNet forward + backward to its input: what remains when everything else is free.
    Returns (seconds, FLOPs) of that work."""
    from imglora.models.load import load_pipeline

    unet = load_pipeline(model).unet.to(device, dtype)
    unet.requires_grad_(False)
    latent = size // 8
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype, requires_grad=True)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size/crop conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                               device=device, dtype=dtype)}
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(x, t, ctx, **extra).sample.float().square().mean().backward()
    flops = counter.get_total_flops()
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unet(x, t, ctx, **extra).sample.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), flops


@functools.cache
def _torchvision_works() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True)
    return r.returncode == 0


def bench_training(model, args) -> dict:
    """Whole-run wall time and memory of ours, its variants and the peer; steady-state step time vs the limit."""
    work = Path(tempfile.mkdtemp(prefix="imglora-bench-"))
    n_images = max(16, args.batch * 4)
    ours_data, peer_data = make_data(work / "data", n_images, args.size)
    rank = 4
    runs: dict[str, list] = {"ours": [], **{f"ours+{v}": [] for v in args.variants}, "peer": []}
    for rep in range(args.reps):  # alternate: ours, its variants, peer, ours, ...
        for who in runs:
            if who == "peer":
                if not args.diffusers_script:
                    continue
                cmd = peer_cmd(args.diffusers_script, model, peer_data, work / "p", args.steps, args.batch,
                               args.size, rank, args)
            else:
                extra = VARIANTS[who.split("+")[1]] if "+" in who else ()
                cmd = ours_cmd(model, ours_data, work / "o", args.steps, args.batch, args.size, rank, args, extra)
            runs[who].append(run(cmd, {}))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f}s ({v[-1]['step_s'] * 1000:.1f} ms/step)"
                                         for k, v in runs.items() if v), file=sys.stderr)
    out: dict = {"size": args.size, "batch": args.batch, "steps": args.steps, "rank": rank, "targets": "attn"}
    for who, rs in runs.items():
        if not rs:
            continue
        out[f"{who}_wall_s"] = statistics.median(r["wall_s"] for r in rs)
        out[f"{who}_step_s"] = statistics.median(r["step_s"] for r in rs)
        out[f"{who}_peak_rss_mb"] = statistics.median(r["maxrss_mb"] for r in rs)
        out[f"{who}_step_anon_mb"] = statistics.median(r["step_anon_mb"] for r in rs)
        if "cuda_max_allocated_mb" in rs[0]:
            out[f"{who}_cuda_peak_mb"] = statistics.median(r["cuda_max_allocated_mb"] for r in rs)
    if "peer_wall_s" in out:
        out["speedup_wall_x"] = out["peer_wall_s"] / out["ours_wall_s"]
        out["memory_ratio"] = out["ours_peak_rss_mb"] / out["peer_peak_rss_mb"]
        if "ours_cuda_peak_mb" in out:
            out["cuda_memory_ratio"] = out["ours_cuda_peak_mb"] / out["peer_cuda_peak_mb"]
        out["speedup_step_x"] = out["peer_step_s"] / out["ours_step_s"]
    if "ours_step_s" in out:
        device = torch.device(args.device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        out["limit_s"], flops = limit_seconds(model, args.size, args.batch, device, dtype)
        out["step_over_limit"] = out["ours_step_s"] / out["limit_s"]
        # A LoRA step does at least the limit's FLOPs; achieved rate against the GPU's dense peak.
        out["ours_tflops"] = flops / out["ours_step_s"] / 1e12
        if device.type == "cuda" and "H100" in torch.cuda.get_device_name():
            out["ours_fraction_of_989_tflops"] = out["ours_tflops"] / 989
    return out


def bench_scaling(model, args) -> dict:
    """Our steady-state step time against resolution (at --batch) and against batch size (at --size)."""
    work = Path(tempfile.mkdtemp(prefix="imglora-scale-"))
    shapes = [(s, args.batch) for s in args.scale_sizes] + [(args.size, b) for b in args.scale_batches]
    out: dict = {"steps": args.steps}
    for size, batch in dict.fromkeys(shapes):  # in order, each shape once
        data, _ = make_data(work / f"data{size}", max(16, batch * 4), size)
        r = run(ours_cmd(model, data, work / "o", args.steps, batch, size, 4, args), {})
        key = f"{size}px_b{batch}"
        out[f"{key}_step_s"] = r["step_s"]
        out[f"{key}_images_per_s"] = batch / r["step_s"]
        out[f"{key}_peak_rss_mb"] = r["maxrss_mb"]
        if "cuda_max_allocated_mb" in r:
            out[f"{key}_cuda_peak_mb"] = r["cuda_max_allocated_mb"]
        print(f"{key}: {r['step_s'] * 1000:.0f} ms/step", file=sys.stderr)
    return out
