"""The `imglora` command: each subcommand parses its flags and makes one library call.

Errors in the user's input surface as one line `imglora: FILE: what — what to do` and exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path

from .config import FIELDS, FORMAT_HELP, add_arguments
from .errors import ImgloraError, escaped, run_command, shown
from .threads import configure as configure_threads

MAX_WEIGHT = 100.0  # an adapter weight beyond this is a typo (1e30), never an image
MAX_SEED = 2**63 - 1
SAVE_PRECISION = FIELDS["save_precision"]  # what training saves, so merge/resize/convert default to the same


# -- numbers, checked while parsing: before any file or model is loaded ----------------------------
def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") \
            from None


def at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {low} to {high}" if high is not None
                                             else f"{text} is below {low}")
        return value
    parse.__name__ = "int"
    return parse


def pixels(text: str) -> int:
    """An image side: a positive multiple of 8 (the VAE's factor)."""
    value = _number(int, text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8 (the VAE works in 8-pixel "
                                         f"cells): use e.g. {max(8, value // 8 * 8)}")
    return value


def finite(text: str) -> float:
    value = _number(float, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def lora_spec(spec: str):
    """FILE[:OPTIONS] (lora/tags.py: weights, te=, unet=, lbw=, start=, stop=, keyframes) -> (file, Options).
    The file is the longest ':'-prefix that exists, else the part up to '.safetensors'."""
    from .lora.tags import parse_options

    parts = spec.split(":")
    cut = next((i for i in range(len(parts), 0, -1) if Path(":".join(parts[:i])).is_file()), None)
    if cut is None:
        cut = next((i + 1 for i, p in enumerate(parts) if p.lower().endswith(".safetensors")), 1)
    try:
        return ":".join(parts[:cut]), parse_options(parts[cut:], MAX_WEIGHT)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from None


def out_format(text: str) -> str:
    return {"peft": "diffusers"}.get(text, text)  # the old name of the diffusers format still works


class Parser(argparse.ArgumentParser):
    """argparse, with bad usage as one line (RELIABILITY.md §6) instead of the usage block."""

    def error(self, message):
        print(f"imglora: {escaped(message)} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# -- generate -------------------------------------------------------------------------------------
def generate_command(args) -> None:
    from .formats.files import read_header
    from .generate import GenerateArgs, generate, parameters_text, save_png
    from .lora.adapters import Adapters
    from .lora.tags import blend_of
    from .pipeline import attach, load_model

    # Everything that can fail is checked before the model loads and anything renders.
    outputs = _output_names(args.out, args.batch, args.overwrite)
    for path, _ in args.lora:
        read_header(path)  # exists and is a whole safetensors file
    model = load_model(args.model, device=args.device, dtype=_torch_dtype(args.dtype), config=args.model_config)
    adapters = Adapters(model.pipe)
    options = {attach(model, adapters, path, opts.weight): opts for path, opts in args.lora}
    ga = GenerateArgs(args.prompt, args.negative, args.seed, args.steps, args.guidance, args.width, args.height,
                      batch=args.batch, blend=blend_of(options, normalize=args.normalize))
    images = generate(model, ga, adapters, progress=True)
    for i, (image, out) in enumerate(zip(images, outputs)):
        save_png(image, out, parameters_text(model, ga, args.seed + i), overwrite=args.overwrite)
        print(shown(out))


def _output_names(out: str | None, n: int, overwrite: bool) -> list[Path]:
    """The requested name (numbered for a batch), refused if it exists without --overwrite; with no --out,
    the first n free imglora-NNNNN.png."""
    if out:
        p = Path(out)
        names = [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}") for i in range(n)]
        for name in names:
            if name.exists() and not overwrite:
                raise ImgloraError("already exists", "choose another --out or pass --overwrite (nothing was rendered)",
                                   path=name)
        return names
    names, k = [], 0
    while len(names) < n:
        if not Path(f"imglora-{k:05d}.png").exists():
            names.append(Path(f"imglora-{k:05d}.png"))
        k += 1
    return names


# -- inspect / convert / merge / resize -----------------------------------------------------------
def inspect_command(args) -> None:
    from .formats.inspect import describe, render

    infos = [describe(f) for f in args.files]
    if len(args.files) == 1:
        print(json.dumps(infos[0], indent=2, ensure_ascii=False) if args.json else render(infos[0]))
        return
    from .formats.lora_file import load_adapter
    from .ops import interact

    names = [Path(f).stem for f in args.files]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    adapters = {n: load_adapter(f)[0] for n, f in zip(names, args.files)}
    weights = _model_weights(args, list(adapters.values()), args.files[0]) if args.model else None
    result = interact.report(adapters, base_weights=weights)
    if args.json:
        print(json.dumps({"files": infos, "interaction": result}, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join([render(i) for i in infos] + ["How they interact, per block:\n" + interact.render(result)]))


def _refuse_existing(path: str, overwrite: bool) -> None:
    """Before any input is read: an existing output is never replaced without --overwrite."""
    if Path(path).exists() and not overwrite:
        raise ImgloraError("already exists", "choose another name or pass --overwrite", path=path)


def _plain(adapter, path):
    """The adapter, if merge and resize can take it (plain LoRA/LoCon modules); else a one-line error."""
    from .ops.resize import not_plain_lora

    why = not_plain_lora(adapter)
    if why:
        raise ImgloraError(f"resize works on LoRA/LoCon modules, and {why}",
                           "make it a plain LoRA first: imglora convert IN OUT --to lora --rank N", path=path)
    return adapter


def _ranks(adapter) -> str:
    return "/".join(map(str, sorted(set(adapter.ranks()))))


def _save_dtype(adapter, precision: str, path: str):
    """The torch dtype of --save-precision, refused up front if the adapter's values overflow it (fp16: 65504)."""
    import torch

    dtype = _torch_dtype(precision)
    if dtype == torch.float16:
        # diffusers files carry the scale in lora_B: the largest value written is at most max|t|·max(1, scale).
        top = max((float(t.abs().max()) * max(1.0, getattr(m, "scale", 1.0)) for m in adapter.modules.values()
                   for t in (m.tensors().values() if hasattr(m, "tensors") else (m.A, m.B))), default=0.0)
        if top > torch.finfo(torch.float16).max:
            raise ImgloraError(f"values up to {top:.3g} do not fit in fp16 (at most 65504)",
                               "pass --save-precision fp32 or bf16", path=path)
    return dtype


def _model_weights(args, adapters_of: list, path: str):
    """The weights of --model (default: the embedded model) under these adapters' modules, after checking
    that the adapters were made for it: the ΔW of DoRA, OFT, (IA)³ and GLoRA depends on them, and LoHa/LoKr
    store conv kernels flat."""
    from .formats.detect import check_arch
    from .ops.extract import weights_of
    from .pipeline import load_model

    model = load_model(args.model, config=args.model_config)
    for adapter in adapters_of:
        check_arch(adapter.arch, model.arch, path)
    keys = {k for a in adapters_of for k in a.modules}
    return weights_of(model.pipe, keys)


def convert_command(args) -> None:
    from .formats.embeddings import carried_tokens
    from .formats.inspect import format_name
    from .formats.lora_file import load_adapter, save_adapter

    _refuse_existing(args.output, args.overwrite)
    adapter, fmt = load_adapter(args.input)
    tokens = carried_tokens([args.input], args.to)
    if args.arch:
        adapter.arch = args.arch
    if args.to == "lora":
        from .formats.metadata import build_metadata
        from .ops.extract import to_lora

        if args.rank is None:
            raise ImgloraError("--to lora needs --rank N", "pass the rank of the plain LoRA to write")
        try:
            lora, energy, notes = to_lora(adapter, args.rank, _model_weights(args, [adapter], args.input), progress=True)
        except ValueError as e:
            raise ImgloraError(str(e), "pass the --model the adapter was made for", path=args.input) from None
        for note in notes:
            print(f"imglora: note: {note}", file=sys.stderr)
        meta = build_metadata(lora, lora.arch, Path(args.output).stem,
                              extra={"imglora.converted_from": os.path.basename(args.input)})
        save_adapter(args.output, lora, metadata=meta, overwrite=args.overwrite,
                     dtype=_save_dtype(lora, args.save_precision, args.output), embeddings=tokens)
        print(f"{shown(args.input)} ({format_name(fmt)}, {', '.join(sorted(adapter.kinds()))}) -> {shown(args.output)} "
              f"(plain LoRA, kohya, rank {_ranks(lora)}, {args.save_precision}), {energy.line()}")
        return
    save_adapter(args.output, adapter, fmt=args.to, overwrite=args.overwrite,
                 dtype=_save_dtype(adapter, args.save_precision, args.output), embeddings=tokens)
    print(f"{shown(args.input)} ({format_name(fmt)}) -> {shown(args.output)} ({args.to}, {len(adapter.modules)} "
          f"modules, {args.save_precision})")


def merge_command(args) -> None:
    from .formats.embeddings import carried_tokens
    from .formats.lora_file import load_adapter, save_adapter
    from .formats.metadata import build_metadata
    from .ops.merge import concatenate
    from .ops.resize import resize

    from .lora.tags import blend_of
    from .ops.merge import blend_parts, merge_kinds
    from .ops.resize import not_plain_lora

    _refuse_existing(args.output, args.overwrite)
    blend = blend_of({str(i): opts for i, (_, opts) in enumerate(args.inputs)})
    tokens = carried_tokens([path for path, _ in args.inputs], args.to)
    parts = []
    for i, (path, _) in enumerate(args.inputs):
        try:
            parts += blend_parts(load_adapter(path)[0], blend, str(i))
        except ValueError as e:
            raise ImgloraError(str(e).replace(f"{i} has", "it has", 1), "leave start=/stop=/keyframes out of merge",
                               path=path) from None
    if any(not_plain_lora(a) for a, _ in parts):  # any other kind: blended through its ΔW
        try:
            merged, energy = merge_kinds(parts, _model_weights(args, [a for a, _ in parts], args.inputs[0][0]),
                                         args.rank)
        except ValueError as e:
            raise ImgloraError(str(e), "merge adapters made for the same base model, with that --model") from None
        args.rank = None  # already applied
    else:
        try:
            merged, energy = concatenate(parts), None
        except ValueError as e:
            raise ImgloraError(str(e), "merge adapters made for the same base model") from None
    if args.rank is not None:
        top = max(merged.ranks(), default=0)
        if args.rank > top:
            raise ImgloraError(f"--rank {args.rank} is above the merged rank {top} (the exact concatenation's)",
                               f"choose a rank from 1 to {top}, or leave --rank out for the exact merge")
        merged, energy = resize(merged, args.rank)
    sources = [{"file": os.path.basename(p), "weight": o.weight, **({"te_weight": o.te} if o.te is not None else {}),
                **({"block_weights": list(o.blocks)} if o.blocks else {})} for p, o in args.inputs]
    meta = build_metadata(merged, merged.arch, Path(args.output).stem,
                          extra={"modelspec.merged_from": ", ".join(s["file"] for s in sources),
                                 "imglora.merged_from": sources})
    save_adapter(args.output, merged, fmt=args.to, metadata=meta, overwrite=args.overwrite,
                 dtype=_save_dtype(merged, args.save_precision, args.output), embeddings=tokens)
    print(f"{shown(args.output)}: {len(merged.modules)} modules, rank {_ranks(merged) or 'full'}, "
          f"{args.save_precision}" + (f", {energy.line()}" if energy else " (exact)"))


def resize_command(args) -> None:
    from .formats.embeddings import carried_tokens
    from .formats.lora_file import load_adapter, save_adapter
    from .formats.metadata import resized_metadata
    from .ops.resize import resize

    _refuse_existing(args.output, args.overwrite)
    adapter = _plain(load_adapter(args.input)[0], args.input)
    top = max(adapter.ranks(), default=0)
    if args.rank > top:
        raise ImgloraError(f"--rank {args.rank} is above the file's rank {top}",
                           f"resize lowers the rank: choose 1 to {top}", path=args.input)
    small, energy = resize(adapter, args.rank)
    tokens = carried_tokens([args.input], "kohya")
    save_adapter(args.output, small, metadata=resized_metadata(adapter.metadata, small), overwrite=args.overwrite,
                 dtype=_save_dtype(small, args.save_precision, args.output), embeddings=tokens)
    print(f"{shown(args.output)}: rank {_ranks(small)}, {args.save_precision}, {energy.line()}")


def train_command(args) -> None:
    from .config import load_config
    from .train.loop import train

    train(load_config(args))


def demo_command(args) -> None:
    from .synthetic.demo import next_steps, run_demo, summary_line

    result = run_demo(output=args.output, seed=args.seed, steps=args.steps)
    print(summary_line(result), flush=True)
    print(next_steps(result, args.output, opening_ui=args.ui), flush=True)
    if args.ui:
        from ui.app import launch

        launch(model=None, adapters_dir=args.output, host="127.0.0.1", port=args.port, auth=None, share=False,
               device="cpu", max_upload_mb=512, outputs_dir=str(Path(args.output) / "outputs"),
               datasets_dir=str(Path(args.output) / "datasets"))  # the Train tab, to train the demo again there


def ui_command(args) -> None:
    from ui.app import launch  # the app lives beside the library; only this edge imports it

    from ui.session import Limits

    limits = Limits(steps=args.max_steps, seconds=args.max_seconds)
    launch(model=args.model, adapters_dir=args.adapters, host=args.host, port=args.port, auth=args.auth,
           share=args.share, device=args.device, max_upload_mb=args.max_upload_mb, outputs_dir=args.outputs,
           limits=limits, model_config=args.model_config, datasets_dir=args.datasets, captioners_dir=args.captioners)


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


def model_options(parser, help: str) -> None:
    parser.add_argument("--model", help=help)
    parser.add_argument("--model-config", help="diffusers folder whose configs describe a single-file --model")


def extract_command(args) -> None:
    from .formats.lora_file import save_adapter
    from .formats.metadata import build_metadata
    from .lora.adapters import Adapters
    from .ops.extract import extract, weights_of
    from .pipeline import load_model

    _refuse_existing(args.output, args.overwrite)
    base = load_model(args.base, config=args.model_config)
    tuned = load_model(args.tuned, config=args.model_config)
    if (base.arch, base.layers_per_block) != (tuned.arch, tuned.layers_per_block):
        raise ImgloraError(f"the models differ in architecture ({base.arch} and {tuned.arch})",
                           "extract from a fine-tune and the base it was tuned from", path=args.tuned)
    keys = Adapters(base.pipe).targets(args.targets, text_encoder=not args.no_text_encoder, te_mlp=True)
    lora, energy = extract(weights_of(base.pipe, keys), weights_of(tuned.pipe, keys), args.rank, args.conv_rank)
    if not lora.modules:
        raise ImgloraError("the two models have the same weights in every compared layer", "nothing to extract",
                           path=args.tuned)
    lora.arch = base.arch
    meta = build_metadata(lora, base.arch, Path(args.output).stem, base.prediction,
                          extra={"imglora.extracted_from": {"base": os.path.basename(args.base),
                                                            "tuned": os.path.basename(args.tuned)}})
    save_adapter(args.output, lora, metadata=meta, overwrite=args.overwrite, layers_per_block=base.layers_per_block,
                 dtype=_save_dtype(lora, args.save_precision, args.output))
    print(f"{shown(args.output)}: {len(lora.modules)} of {len(keys)} layers changed, rank {_ranks(lora)}, "
          f"{energy.line()}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="imglora", description="LoRA training, files and blending for SD 1.x/2.x/XL")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with adapters blended")
    g.add_argument("--model", help="diffusers folder or checkpoint (default: the embedded model)")
    g.add_argument("--model-config", help="diffusers folder whose configs describe a single-file --model "
                   "(nothing is downloaded)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:OPTIONS]", type=lora_spec,
                   help=f"adapter file and its blend, repeatable: a weight from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                        "(default 1.0), or A1111's options: TE:UNET weights, lbw=PRESET|LIST (block weights), "
                        "start=N, stop=N, step=A-B, keyframes such as 0@0,1@0.5 (README: Blend control)")
    g.add_argument("--normalize", action="store_true", help="keep each layer's summed update within the norm of "
                   "its largest single update (for stacked adapters that overpower each other)")
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--negative", default="", help="negative prompt (default: none)")
    g.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="seed of the first image "
                   "(default: %(default)s)")
    g.add_argument("--steps", type=at_least(1), help="inference steps (default: the model's, else 50)")
    g.add_argument("--guidance", type=finite, help="classifier-free guidance scale (default: the model's, else 7.5; "
                   "5.0 for SDXL)")
    g.add_argument("--width", type=pixels, help="image width in pixels, a multiple of 8 (default: the model's "
                   "resolution)")
    g.add_argument("--height", type=pixels, help="image height in pixels, a multiple of 8 (default: the model's "
                   "resolution)")
    g.add_argument("--batch", type=at_least(1, 1024), default=1, help="images, with seeds SEED, SEED+1, ... "
                   "(default: %(default)s)")
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

    i = sub.add_parser("inspect", help="format, base model, rank, alpha, targets and metadata of an adapter; "
                                       "with several, how they interact per block")
    i.add_argument("files", nargs="+", metavar="FILE", help="adapter .safetensors file(s), any format and kind; "
                   "with two or more: each one's ΔW norm per block, their cosine overlaps and top singular values")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    model_options(i, "with several files: the base model, for kinds whose ΔW depends on it (DoRA, OFT, (IA)³, "
                     "GLoRA; default: such modules are left out of the interaction report)")
    i.set_defaults(func=inspect_command)

    c = sub.add_parser("convert", help="rewrite an adapter in kohya or diffusers format, or any kind as a plain LoRA")
    c.add_argument("input", help="adapter file to read (any format and kind imglora reads)")
    c.add_argument("output", help="adapter file to write")
    c.add_argument("--to", choices=["kohya", "diffusers", "lora"], type=out_format, required=True,
                   help=FORMAT_HELP + "; lora: any other kind (LoHa, LoKr, DoRA, OFT, (IA)³, GLoRA, full) as a plain "
                        "kohya LoRA of --rank by SVD of each ΔW (the energy kept is reported), which diffusers' "
                        "load_lora_weights reads")
    c.add_argument("--rank", type=at_least(1), help="with --to lora: the rank to write")
    model_options(c, "with --to lora: the base model the adapter was made for (DoRA, OFT, (IA)³ and GLoRA "
                     "transform its weights; they also give each ΔW's shape; default: the embedded model)")
    c.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], help="base model, when the file does not say "
                   "(default: the file's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    save_precision(c)
    c.set_defaults(func=convert_command)

    m = sub.add_parser("merge", help="blend adapters into one file (exact, or SVD to --rank)")
    m.add_argument("output", help="merged adapter file to write")
    m.add_argument("inputs", nargs="+", metavar="FILE[:OPTIONS]", type=lora_spec,
                   help=f"adapters to blend, each with its weight, from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                        "(default weight: 1.0), or TE:UNET weights and lbw= block weights as for generate")
    m.add_argument("--rank", type=at_least(1), help="compress the result to this rank by SVD, at most the sum of the "
                   "ranks (default: exact concatenation, rank = the sum of the ranks)")
    m.add_argument("--to", choices=["kohya", "diffusers"], type=out_format, default="kohya",
                   help=FORMAT_HELP + " (default: %(default)s)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    model_options(m, "for inputs other than plain LoRA, blended through their ΔW: the base model they were made "
                     "for (default: the embedded model); without --rank such modules are written as exact full "
                     "deltas")
    save_precision(m)
    m.set_defaults(func=merge_command)

    x = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints (a fine-tune and its base)")
    x.add_argument("base", help="the base model: diffusers folder or .safetensors/.ckpt checkpoint")
    x.add_argument("tuned", help="the fine-tuned model, of the same architecture")
    x.add_argument("output", help="adapter file to write (kohya format)")
    x.add_argument("--rank", type=at_least(1), required=True, help="rank of the LoRA")
    x.add_argument("--conv-rank", type=at_least(1), help="rank of 3x3 convolutions (default: --rank)")
    x.add_argument("--targets", choices=["cross-attn", "attn", "transformer", "conv"], default="transformer",
                   help="UNet layers to compare, as in `imglora train --targets` (default: %(default)s)")
    x.add_argument("--no-text-encoder", action="store_true", help="leave the text encoders out")
    x.add_argument("--model-config", help="diffusers folder whose configs describe single-file checkpoints")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    save_precision(x)
    x.set_defaults(func=extract_command)

    r = sub.add_parser("resize", help="lower an adapter's rank by SVD")
    r.add_argument("input", help="adapter file to read")
    r.add_argument("output", help="adapter file to write")
    r.add_argument("--rank", type=at_least(1), required=True, help="the new rank, from 1 to the file's rank")
    r.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    save_precision(r)
    r.set_defaults(func=resize_command)

    d = sub.add_parser("demo", help="teach the embedded model a new shape and show before/after")
    d.add_argument("--output", default="imglora-demo", help="folder for the dataset, adapter and images "
                   "(default: %(default)s)")
    d.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="seed of the dataset and the training "
                   "(default: %(default)s)")
    d.add_argument("--steps", type=at_least(1), help="training steps (default: the demo recipe's)")
    d.add_argument("--ui", action="store_true", help="then open the app with the new adapter")
    d.add_argument("--port", type=at_least(1, 65535), default=7860, help="port of the app with --ui "
                   "(default: %(default)s)")
    d.set_defaults(func=demo_command)

    u = sub.add_parser("ui", help="open the web app to blend and compare adapters")
    u.add_argument("--model", help="diffusers folder or checkpoint (default: the embedded model)")
    u.add_argument("--model-config", help="diffusers folder whose configs describe a single-file --model")
    u.add_argument("--max-steps", type=at_least(1, 1000), default=100,
                   help="most inference steps one request may ask for (default: %(default)s)")
    u.add_argument("--max-seconds", type=at_least(1, 3600), default=120,
                   help="a generation still running after this many seconds is stopped (default: %(default)s)")
    u.add_argument("--adapters", default="adapters", help="folder of .safetensors adapters (default: ./adapters)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=at_least(1, 65535), default=7860, help="port to listen on (default: %(default)s)")
    u.add_argument("--auth", help="user:password required to open the app (default: none)")
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    u.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    u.add_argument("--max-upload-mb", type=at_least(1), default=512, help="largest adapter upload accepted "
                   "(default: %(default)s)")
    u.add_argument("--outputs", default="outputs", help="folder for generated images, baked models and training runs "
                   "(runs/; default: ./%(default)s)")
    u.add_argument("--datasets", default="datasets", help="folder whose subfolders the Train tab lists as datasets "
                   "(default: ./%(default)s; the Train tab can make the demo dataset in it)")
    u.add_argument("--captioners", default="captioners", help="folder of captioner models for auto-captioning "
                   "(default: ./%(default)s)")
    u.set_defaults(func=ui_command)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads for torch (default: the CPUs this process may use; see README, CPU threads)")
    return p


def save_precision(parser) -> None:
    parser.add_argument("--save-precision", choices=SAVE_PRECISION.metadata["choices"], default=SAVE_PRECISION.default,
                        help="tensor precision of the written file (default: %(default)s, as training saves)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or bad usage (already reported in one line)
        return e.code if isinstance(e.code, int) else 2
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
