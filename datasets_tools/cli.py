"""`imglora-data`: check, inspect and prepare a training folder before any GPU time is spent.

Exit codes: 0 done (or `check` found nothing), 1 `check` found problems, 2 bad usage or input
(one line `imglora-data: ... — what to do`; `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from imglora.errors import ImgloraError, run_command


def check_command(args) -> int:
    from .check import as_dicts, check_folder, load_tokenizer

    findings = check_folder(args.dir, args.min_side, args.max_aspect, args.max_tokens, load_tokenizer(args.tokenizer),
                            near_bits=args.near_bits)
    if args.json:
        print(json.dumps({"folder": args.dir, "problems": as_dicts(findings)}, indent=1, ensure_ascii=False))
    else:
        for f in findings:
            print(f"{f.path}: {f.reason} — {f.fix}")
        print(f"{len(findings)} problem(s) in {args.dir}" if findings else f"{args.dir}: no problems found",
              file=sys.stderr)
    return 1 if findings else 0


def stats_command(args) -> int:
    from .check import load_tokenizer
    from .stats import folder_stats, plot, render

    stats = folder_stats(args.dir, args.resolution, args.bucket_step, args.no_upscale, load_tokenizer(args.tokenizer))
    print(json.dumps(stats, indent=1, default=str) if args.json else render(stats))
    if args.plot:
        print(f"plot: {plot(stats, args.plot)}", file=sys.stderr)
    return 0


def caption_command(args) -> int:
    from .caption import Edits, apply, diff, plan

    replace = {}
    for r in args.replace:
        old, sep, new = r.partition("=")
        if not sep:
            raise ImgloraError(f"--replace {r!r} is not OLD=NEW", "e.g. --replace 'red=crimson'")
        replace[old.strip()] = new.strip()
    edits = Edits(args.create_missing, replace, [t.strip() for t in args.remove], args.dedupe,
                  args.trigger or args.prefix)
    changes = plan(args.dir, edits, args.extension)
    if args.dry_run:
        sys.stdout.write(diff(changes, args.dir))
        print(f"{len(changes)} caption(s) would change (dry run: nothing written)", file=sys.stderr)
        return 0
    backup = apply(args.dir, changes)
    print(f"{len(changes)} caption(s) changed" + (f"; originals in {backup}" if backup else ""), file=sys.stderr)
    return 0


def resize_command(args) -> int:
    from .resize import resize_folder

    bg = tuple(int(args.background[i:i + 2], 16) for i in (1, 3, 5)) if args.background.startswith("#") else None
    if bg is None or len(args.background) != 7:
        raise ImgloraError(f"--background {args.background!r} is not a #rrggbb colour", "e.g. --background '#ffffff'")
    written, skipped = resize_folder(args.dir, args.out, args.max_side, args.buckets, args.bucket_step, bg,
                                     args.format, overwrite=args.overwrite)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{len(written)} image(s) written to {args.out}", file=sys.stderr)
    return 0


def convert_command(args) -> int:
    from .convert import convert

    written = convert(args.dir, args.to, overwrite=args.overwrite)
    print(f"{len(written)} file(s) written", file=sys.stderr)
    return 0


def synth_command(args) -> int:
    from .synth import synth

    written = synth(args.out, args.n, args.seed, args.size, args.shapes, args.colours, args.backgrounds, args.word)
    print(f"{len(written)} images with captions in {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imglora-data", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="list every problem in a training folder")
    c.add_argument("dir")
    c.add_argument("--min-side", type=int, default=64, help="smallest usable image side in pixels")
    c.add_argument("--max-aspect", type=float, default=4.0, help="largest long/short side ratio")
    c.add_argument("--max-tokens", type=int, default=77, help="CLIP tokens a caption may use")
    c.add_argument("--tokenizer", help="CLIP tokenizer folder, or a diffusers model folder (exact token counts)")
    c.add_argument("--near-bits", type=int, default=3, help="perceptual-hash distance that counts as near duplicate")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=check_command)

    s = sub.add_parser("stats", help="sizes, buckets, tags and caption lengths")
    s.add_argument("dir")
    s.add_argument("--resolution", type=int, default=512)
    s.add_argument("--bucket-step", type=int, default=64)
    s.add_argument("--no-upscale", action="store_true")
    s.add_argument("--tokenizer")
    s.add_argument("--plot", help="write the charts to this PNG")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=stats_command)

    e = sub.add_parser("caption", help="bulk-edit sidecar captions (with a backup)")
    e.add_argument("dir")
    e.add_argument("--trigger", help="trigger word put in front of every caption")
    e.add_argument("--prefix", help="any text put in front of every caption")
    e.add_argument("--replace", action="append", default=[], metavar="OLD=NEW", help="replace a tag (repeatable)")
    e.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove a tag (repeatable)")
    e.add_argument("--dedupe", action="store_true", help="remove repeated tags")
    e.add_argument("--create-missing", metavar="filename|folder|TEMPLATE",
                   help="write captions for images without one ({folder} and {stem} in a template)")
    e.add_argument("--extension", default=".txt")
    e.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    e.set_defaults(func=caption_command)

    r = sub.add_parser("resize", help="write upright, flattened, resized copies into OUT")
    r.add_argument("dir")
    r.add_argument("out")
    r.add_argument("--max-side", type=int, help="shrink so that the longer side is at most this")
    r.add_argument("--buckets", type=int, metavar="RESOLUTION", help="crop to the trainer's buckets at this resolution")
    r.add_argument("--bucket-step", type=int, default=64)
    r.add_argument("--background", default="#ffffff", help="colour that transparency is flattened onto")
    r.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=resize_command)

    v = sub.add_parser("convert", help="between metadata.jsonl and sidecar captions")
    v.add_argument("dir")
    v.add_argument("--to", required=True, choices=["jsonl", "sidecar"])
    v.add_argument("--overwrite", action="store_true")
    v.set_defaults(func=convert_command)

    y = sub.add_parser("synth", help="generate a synthetic captioned dataset")
    y.add_argument("kind", choices=["shapes"])
    y.add_argument("out")
    y.add_argument("--n", type=int, default=100)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--size", type=int, default=64)
    y.add_argument("--shapes", nargs="+")
    y.add_argument("--colours", nargs="+")
    y.add_argument("--backgrounds", nargs="+")
    y.add_argument("--word", action="append", default=[], metavar="SHAPE=WORD", help="caption a shape as WORD")
    y.set_defaults(func=synth_command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("imglora-data", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
