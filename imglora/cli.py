"""The `imglora` command: each subcommand parses its flags and makes one library call.

Errors in the user's input surface as one line `imglora: FILE: what — what to do` and exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from .config import FORMAT_HELP, add_arguments
from .errors import ImgloraError, run_command
from .threads import configure as configure_threads


def parse_weighted(spec: str) -> tuple[str, float]:
    """'file.safetensors:0.7' -> (file, 0.7); no ':WEIGHT' means 1.0."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# -- generate -------------------------------------------------------------------------------------
def generate_command(args) -> None:
    from .generate import GenerateArgs, generate, parameters_text, save_png
    from .lora.adapters import Adapters
    from .lora.state import Blend
    from .pipeline import attach, load_model

    model = load_model(args.model, device=args.device, dtype=_torch_dtype(args.dtype))
    adapters = Adapters(model.pipe)
    weights = {}
    for spec in args.lora:
        path, weight = parse_weighted(spec)
        weights[attach(model, adapters, path, weight)] = weight
    ga = GenerateArgs(args.prompt, args.negative, args.seed, args.steps, args.guidance, args.width, args.height,
                      batch=args.batch, blend=Blend(weights))
    images = generate(model, ga, adapters, progress=True)
    for i, image in enumerate(images):
        out = _output_name(args.out, i, len(images), args.overwrite)
        save_png(image, out, parameters_text(model, ga, args.seed + i), overwrite=args.overwrite)
        print(out)


def _output_name(out: str | None, i: int, n: int, overwrite: bool) -> Path:
    """The requested name (numbered for a batch); with no --out, the first free imglora-NNNNN.png."""
    if out:
        p = Path(out)
        return p if n == 1 else p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}")
    k = 0
    while Path(f"imglora-{k:05d}.png").exists():
        k += 1
    return Path(f"imglora-{k:05d}.png")


# -- inspect / convert / merge / resize -----------------------------------------------------------
def inspect_command(args) -> None:
    from .formats.inspect import describe, render

    info = describe(args.file)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else render(info))


def convert_command(args) -> None:
    from .formats.lora_file import load_adapter, save_adapter

    adapter, fmt = load_adapter(args.input)
    if args.arch:
        adapter.arch = args.arch
    save_adapter(args.output, adapter, fmt=args.to, overwrite=args.overwrite)
    print(f"{args.input} ({fmt}) -> {args.output} ({args.to}, {len(adapter.modules)} modules)")


def merge_command(args) -> None:
    from .formats.lora_file import load_adapter, save_adapter
    from .formats.metadata import build_metadata
    from .ops.merge import merge

    parts = [(load_adapter(p)[0], w) for p, w in map(parse_weighted, args.inputs)]
    try:
        merged, energy = merge(parts, args.rank)
    except ValueError as e:
        raise ImgloraError(str(e), "merge adapters made for the same base model") from None
    sources = [{"file": os.path.basename(p), "weight": w} for p, w in map(parse_weighted, args.inputs)]
    meta = build_metadata(merged, merged.arch, Path(args.output).stem,
                          extra={"modelspec.merged_from": ", ".join(s["file"] for s in sources),
                                 "imglora.merged_from": sources})
    save_adapter(args.output, merged, fmt=args.to, metadata=meta,
                 overwrite=args.overwrite)
    ranks = sorted(set(merged.ranks()))
    print(f"{args.output}: {len(merged.modules)} modules, rank {'/'.join(map(str, ranks))}"
          + (f", {energy.line()}" if energy else " (exact concatenation)"))


def resize_command(args) -> None:
    from .formats.lora_file import load_adapter, save_adapter
    from .formats.metadata import resized_metadata
    from .ops.resize import resize

    adapter, _ = load_adapter(args.input)
    small, energy = resize(adapter, args.rank)
    save_adapter(args.output, small, metadata=resized_metadata(adapter.metadata, args.rank), overwrite=args.overwrite)
    print(f"{args.output}: rank {args.rank}, {energy.line()}")


def train_command(args) -> None:
    from .config import load_config
    from .train.loop import train

    train(load_config(args))


def demo_command(args) -> None:
    from .synthetic.demo import run_demo, summary_line

    result = run_demo(output=args.output, seed=args.seed, steps=args.steps)
    print(summary_line(result), flush=True)
    if args.ui:
        from ui.app import launch

        launch(model=None, adapters_dir=args.output, host="127.0.0.1", port=args.port, auth=None, share=False,
               device="cpu", max_upload_mb=512, outputs_dir=str(Path(args.output) / "outputs"))


def ui_command(args) -> None:
    from ui.app import launch  # the app lives beside the library; only this edge imports it

    launch(model=args.model, adapters_dir=args.adapters, host=args.host, port=args.port, auth=args.auth,
           share=args.share, device=args.device, max_upload_mb=args.max_upload_mb, outputs_dir=args.outputs)


# -- parser ---------------------------------------------------------------------------------------
TRAIN_EXAMPLES = """\
examples:
  # a first run: a folder of captioned images and the embedded model, written to ./output
  imglora train --data photos

  # Stable Diffusion 1.5 from a local diffusers folder, text encoder adapted too
  imglora train --data photos --model models/sd15 --resolution 512 --rank 16 --train-text-encoder

  # continue that run from its newest checkpoint in ./output/checkpoints (same flags plus --resume)
  imglora train --data photos --model models/sd15 --resolution 512 --rank 16 --train-text-encoder --resume latest

  # settings from a TOML file (keys are the flag names with _ for -); flags given as well override it
  imglora train --config run.toml
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imglora", description="LoRA training, files and blending for SD 1.x/2.x/XL")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with adapters blended")
    g.add_argument("--model", help="diffusers folder or checkpoint (default: the embedded model)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="adapter file and its blend weight (default weight: 1.0), repeatable")
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--negative", default="", help="negative prompt (default: none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    g.add_argument("--steps", type=int, help="inference steps (default: the model's, else 50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, else 7.5; "
                   "5.0 for SDXL)")
    g.add_argument("--width", type=int, help="image width in pixels (default: the model's resolution)")
    g.add_argument("--height", type=int, help="image height in pixels (default: the model's resolution)")
    g.add_argument("--batch", type=int, default=1, help="images, with seeds SEED, SEED+1, ... (default: %(default)s)")
    g.add_argument("--out", help="output PNG (default: the next free imglora-NNNNN.png)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="precision of the model weights (default: %(default)s)")
    g.set_defaults(func=generate_command)

    t = sub.add_parser("train", help="train an adapter on a folder of captioned images",
                       description="Train a LoRA adapter on a folder of captioned images.\n"
                                   "Settings: the defaults, then the --config TOML, then the flags given.",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(t)
    t.set_defaults(func=train_command)

    i = sub.add_parser("inspect", help="format, base model, rank, alpha, targets and metadata of an adapter")
    i.add_argument("file", help="adapter .safetensors file (kohya or diffusers format)")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=inspect_command)

    c = sub.add_parser("convert", help="rewrite an adapter in kohya or diffusers format")
    c.add_argument("input", help="adapter file to read (kohya or diffusers format)")
    c.add_argument("output", help="adapter file to write")
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True, help=FORMAT_HELP)
    c.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], help="base model, when the file does not say "
                   "(default: the file's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    c.set_defaults(func=convert_command)

    m = sub.add_parser("merge", help="blend adapters into one file (exact, or SVD to --rank)")
    m.add_argument("output", help="merged adapter file to write")
    m.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]",
                   help="adapters to blend, each with its weight (default weight: 1.0)")
    m.add_argument("--rank", type=int, help="compress the result to this rank by SVD (default: exact "
                   "concatenation, rank = the sum of the ranks)")
    m.add_argument("--to", choices=["kohya", "diffusers"], default="kohya",
                   help=FORMAT_HELP + " (default: %(default)s)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    m.set_defaults(func=merge_command)

    r = sub.add_parser("resize", help="lower an adapter's rank by SVD")
    r.add_argument("input", help="adapter file to read")
    r.add_argument("output", help="adapter file to write")
    r.add_argument("--rank", type=int, required=True, help="the new, lower rank")
    r.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    r.set_defaults(func=resize_command)

    d = sub.add_parser("demo", help="teach the embedded model a new shape and show before/after")
    d.add_argument("--output", default="imglora-demo", help="folder for the dataset, adapter and images "
                   "(default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the dataset and the training (default: %(default)s)")
    d.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    d.add_argument("--ui", action="store_true", help="then open the app with the new adapter")
    d.add_argument("--port", type=int, default=7860, help="port of the app with --ui (default: %(default)s)")
    d.set_defaults(func=demo_command)

    u = sub.add_parser("ui", help="open the web app to blend and compare adapters")
    u.add_argument("--model", help="diffusers folder or checkpoint (default: the embedded model)")
    u.add_argument("--adapters", default="adapters", help="folder of .safetensors adapters (default: ./adapters)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    u.add_argument("--auth", help="user:password required to open the app (default: none)")
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    u.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    u.add_argument("--max-upload-mb", type=int, default=512, help="largest adapter upload accepted "
                   "(default: %(default)s)")
    u.add_argument("--outputs", default="outputs", help="folder for generated images and baked models "
                   "(default: ./%(default)s)")
    u.set_defaults(func=ui_command)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads for torch (default: the CPUs this process may use; see README, CPU threads)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print("imglora: --threads must be at least 1", file=sys.stderr)
        return 2
    configure_threads(args.threads)  # before anything loads torch
    return run_command("imglora", args.func, args)


def entry() -> None:
    """The `imglora` program: main(), then an exit that skips the cyclic garbage collection of
    interpreter shutdown. With torch, diffusers and transformers loaded that collection takes over a
    second (measured 1.37 s of a 9 s training run) and frees nothing anyone sees. Finalizers, atexit
    handlers and open files still close as usual; only cycle detection is off from here on."""
    code = main()
    gc.disable()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
