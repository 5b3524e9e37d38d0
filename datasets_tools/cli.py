"""`imglora-data`: check, inspect and prepare a training folder before any GPU time is spent.

Exit codes: 0 done (or `check` found nothing), 1 `check` found problems, 2 bad usage or input
(one line `imglora-data: ... — what to do`; `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imglora.data import MIN_IMAGE_SIDE
from imglora.data.captions import print_note
from imglora.errors import ImgloraError, escaped, run_command, shell_word, shown

PROG = "imglora-data"


class Parser(argparse.ArgumentParser):
    """argparse, with bad usage as one line (RELIABILITY.md §6) instead of the usage block."""

    def error(self, message):
        print(f"{PROG}: {message} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def percent(text: str) -> int:
    value = positive(int)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text} is above 100")
    return value


def colour(text: str) -> tuple[int, int, int]:
    """'#rrggbb', '#rgb' or a CSS colour name."""
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(text.strip())[:3]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a colour (e.g. '#ffffff' or white)") from None


def training_resolution(args) -> int:
    """The resolution the trainer would use: --resolution, else the model's own (--model, default the
    embedded model), else 512, as `imglora train` decides it."""
    if args.resolution:
        return args.resolution
    from imglora.models.load import native_resolution

    return native_resolution(args.model) or 512


def check_command(args) -> int:
    from .check import check_folder, load_tokenizer

    report = check_folder(args.dir, args.min_side, args.max_aspect, args.max_tokens, load_tokenizer(args.tokenizer),
                          near_bits=args.near_bits, workers=args.workers, progress=not args.quiet,
                          fallback=args.caption_fallback, trigger=args.trigger,
                          caption_extensions=tuple(dict.fromkeys((args.caption_extension, ".txt", ".caption"))),
                          resolution=training_resolution(args), bucket_step=args.bucket_step,
                          min_bucket=args.min_bucket, max_bucket=args.max_bucket, no_upscale=args.no_upscale,
                          mask_dir=args.mask_dir)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1, ensure_ascii=False))
    else:
        for note in report.notes:
            print_note(note)
        for f in report.findings:
            print(f"{shown(f.path)}: {f.severity}: {escaped(f.reason)} — {escaped(f.fix)}")
        d = report.as_dict()
        print(f"{shown(args.dir)}: {report.images} images, {d['errors']} error(s) (files training cannot use), "
              f"{d['warnings']} warning(s)" if report.findings else
              f"{shown(args.dir)}: {report.images} images, no problems found", file=sys.stderr)
    return 1 if report.findings else 0


def stats_command(args) -> int:
    from .check import load_tokenizer
    from .stats import folder_stats, plot, render

    if args.plot:
        from .resize import refuse_inside

        if not args.plot.lower().endswith(".png"):
            raise ImgloraError("--plot writes a PNG image", "give it a name ending in .png", path=args.plot)
        refuse_inside(args.dir, args.plot)
        if Path(args.plot).exists() and not args.overwrite:  # before any work
            raise ImgloraError("already exists", "choose another name or pass --overwrite", path=args.plot)
    stats = folder_stats(args.dir, training_resolution(args), args.bucket_step, args.no_upscale,
                         load_tokenizer(args.tokenizer), min_bucket=args.min_bucket, max_bucket=args.max_bucket,
                         fallback=args.caption_fallback, workers=args.workers, progress=not args.quiet,
                         min_side=args.min_side)
    if args.json:
        print(json.dumps(stats, indent=1, default=str, ensure_ascii=False))
    else:
        for note in stats["notes"]:
            print_note(note)
        print(render(stats))
    if args.plot:
        print(f"plot: {shown(plot(stats, args.plot, overwrite=args.overwrite))}", file=sys.stderr)
    return 0


def clean(folder) -> None:
    """Remove what a killed earlier run left in `folder` (temp files, unfinished backups), and say so."""
    from .caption import clean_leftovers

    removed = clean_leftovers(folder)
    if removed:
        print_note(f"removed {len(removed)} leftover(s) of an interrupted run in {shown(folder)} "
                   f"(first: {shown(removed[0])})")


def caption_command(args) -> int:
    from .caption import Edits, plan, restore

    if args.model:
        return autocaption_command(args)
    given = [name for name in GENERATION_FLAGS if getattr(args, name) not in (None, False, [])]
    if given:
        raise ImgloraError(f"--{given[0].replace('_', '-')} is for writing captions with a model",
                           "add --model MODEL_DIR")
    if args.restore:
        restored = restore(args.dir, args.restore)  # first: the backup it names is never cleaned away
        clean(args.dir)
        print(f"{len(restored)} caption file(s) restored from {shown(args.restore)}", file=sys.stderr)
        return 0
    replace = {}
    for r in args.replace:
        old, sep, new = r.partition("=")
        if not sep or not old.strip():
            raise ImgloraError(f"--replace {r!r} is not OLD=NEW", "e.g. --replace 'red=crimson'")
        replace[old.strip()] = new.strip()
    if args.trigger and args.prefix:
        raise ImgloraError("--trigger and --prefix both given", "use one (they do the same thing)")
    edits = Edits(args.create_missing, replace, [t.strip() for t in args.remove], args.dedupe,
                  args.trigger or args.prefix)
    if edits.is_empty():
        raise ImgloraError("nothing to do", "give --trigger, --replace, --remove, --dedupe or --create-missing, "
                           "or --model to write captions with a model")
    changes, notes = plan(args.dir, edits, args.extension)
    return _preview_or_apply(args.dir, changes, notes, args.dry_run, "caption file(s)")


# `caption` options that only apply with --model (dest names)
GENERATION_FLAGS = ("overwrite", "append", "limit", "batch_size", "device", "prompt", "max_new_tokens",
                    "min_new_tokens", "num_beams", "dtype", "threshold", "character_threshold", "exclude_tags",
                    "replace_underscores", "max_tags", "ratings")


def autocaption_command(args) -> int:
    """`caption DIR --model MODEL`: write captions with a local model (datasets_tools/autocaption.py)."""
    from .autocaption import caption_folder, summary
    from .caption import diff

    edits = [flag for flag, given in (("--replace", args.replace), ("--remove", args.remove), ("--dedupe", args.dedupe),
                                      ("--create-missing", args.create_missing), ("--restore", args.restore)) if given]
    if edits:
        raise ImgloraError(f"--model writes captions and {edits[0]} edits them", "run them as two commands")
    if args.trigger and args.prefix:
        raise ImgloraError("--trigger and --prefix both given", "use one (they do the same thing)")
    if args.overwrite and args.append:
        raise ImgloraError("--overwrite and --append both given", "use one: --overwrite replaces a caption, "
                           "--append adds after it")
    existing = "overwrite" if args.overwrite else "append" if args.append else "skip"
    exclude = [t.strip() for group in args.exclude_tags for t in group.split(",") if t.strip()] or None
    options = dict(prompt=args.prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                   num_beams=args.num_beams, device=args.device, dtype=args.dtype, threshold=args.threshold,
                   character_threshold=args.character_threshold, exclude_tags=exclude,
                   replace_underscores=args.replace_underscores, max_tags=args.max_tags, ratings=args.ratings or None)
    if not args.dry_run:
        clean(args.dir)
    result = caption_folder(args.dir, args.model, existing=existing, trigger=args.trigger or args.prefix,
                            extension=args.extension, batch_size=args.batch_size, limit=args.limit,
                            dry_run=args.dry_run, progress=not args.quiet, options=options)
    for note in result.notes:
        print_note(note)
    for path, reason in result.failed:
        print(f"skipped {shown(path)}: {escaped(reason)}", file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(diff(result.changes, args.dir))
    print(summary(args.dir, result, existing, args.dry_run), file=sys.stderr)
    return 130 if result.interrupted else 0


def _preview_or_apply(folder, changes, notes, dry_run: bool, what: str) -> int:
    """Print the notes, then either the diff (dry run) or apply the changes with a backup of every file
    they replace; `imglora-data caption --restore` undoes either command."""
    from .caption import apply, diff

    for note in notes:
        print_note(note)
    if dry_run:
        sys.stdout.write(diff(changes, folder))
        print(f"{len(changes)} {what} would change (dry run: nothing written)", file=sys.stderr)
        return 0
    clean(folder)
    backup = apply(folder, changes)
    print(f"{len(changes)} {what} changed" + (f"; originals in {shown(backup)} (undo: imglora-data caption "
          f"{shell_word(folder)} --restore {shell_word(backup)})" if backup else ""), file=sys.stderr)
    return 0


def resize_command(args) -> int:
    from .resize import refuse_inside, resize_folder

    refuse_inside(args.dir, args.out)
    clean(args.out)
    written, skipped = resize_folder(args.dir, args.out, args.max_side, args.buckets, args.bucket_step,
                                     args.background, args.format, args.quality, overwrite=args.overwrite,
                                     no_upscale=args.no_upscale, workers=args.workers, progress=not args.quiet)
    for path, reason in skipped:
        print(f"skipped {shown(path)}: {escaped(reason)}", file=sys.stderr)
    print(f"{len(written)} image(s) written to {shown(args.out)}", file=sys.stderr)
    return 0


def convert_command(args) -> int:
    from .convert import convert, copy_dataset
    from .resize import refuse_inside

    if args.out:
        refuse_inside(args.dir, args.out)
        clean(args.out)
        written, notes = copy_dataset(args.dir, args.out, args.to, one_file=args.one_file, overwrite=args.overwrite)
        for note in notes:
            print_note(note)
        print(f"{len(written)} file(s) written to {shown(args.out)}", file=sys.stderr)
        return 0
    changes, notes = convert(args.dir, args.to, one_file=args.one_file, overwrite=args.overwrite)
    return _preview_or_apply(args.dir, changes, notes, args.dry_run, "file(s)")


def synth_command(args) -> int:
    from .synth import synth

    written = synth(args.out, args.n, args.seed, args.size, args.shapes, args.colours, args.backgrounds, args.word,
                    distractor_masks=args.distractor)
    print(f"{len(written)} images with captions in {shown(args.out)}"
          + (f", masks of their main shape in {shown(args.distractor)} (train with --masked-loss --mask-dir "
             f"{shell_word(args.distractor)})" if args.distractor else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0].replace("`", ""))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def training(s):
        """The settings that decide what training uses and how it buckets, with the trainer's defaults."""
        s.add_argument("--model", help="as in training: the base model whose resolution the buckets are made for "
                       "(default: the embedded model, 64 px)")
        s.add_argument("--resolution", type=positive(int), help="as in training: the resolution the buckets are "
                       "made for (default: the model's)")
        s.add_argument("--bucket-step", type=positive(int), default=64, help="as in training: bucket side step in "
                       "pixels (default: %(default)s)")
        s.add_argument("--min-bucket", type=positive(int), help="as in training: smallest bucket side "
                       "(default: resolution/2)")
        s.add_argument("--max-bucket", type=positive(int), help="as in training: largest bucket side "
                       "(default: resolution*2)")
        s.add_argument("--no-upscale", action="store_true", help="as in training: small images keep their size")
        s.add_argument("--min-side", type=positive(int), default=MIN_IMAGE_SIDE, help="as in training "
                       "(--min-image-side): smallest usable image side in pixels (default: %(default)s)")

    def common(s, workers=True):
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        if workers:
            s.add_argument("--workers", type=positive(int), help="parallel threads (default: 2 per CPU, at most 8)")

    c = sub.add_parser("check", help="list every problem in a training folder (exit 1 if any)")
    c.add_argument("dir", help="training folder to check")
    c.add_argument("--max-aspect", type=positive(float), default=4.0, help="largest long/short side ratio "
                   "(default: %(default)s)")
    c.add_argument("--max-tokens", type=positive(int), default=77, help="CLIP tokens a caption may use "
                   "(default: %(default)s)")
    c.add_argument("--tokenizer", help="CLIP tokenizer folder, or a diffusers model folder (exact token counts; "
                   "default: an estimate)")
    c.add_argument("--near-bits", type=int, default=6, help="perceptual-hash bits that may differ in a near "
                   "duplicate (-1: off; default: %(default)s)")
    c.add_argument("--caption-fallback", help="as in training: folder, filename or a template with {folder}, {stem}")
    c.add_argument("--trigger", help="as in training: counted in the caption length")
    c.add_argument("--caption-extension", default=".txt", help="as in training: sidecar caption extension "
                   "(.txt and .caption are read too; default: %(default)s)")
    c.add_argument("--mask-dir", metavar="DIR", help="as in training (--masked-loss --mask-dir): also check the "
                   "masks in DIR, named as the images (unreadable, another aspect ratio, all black, without an image)")
    c.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    training(c)
    common(c)
    c.set_defaults(func=check_command)

    s = sub.add_parser("stats", help="sizes, buckets, tags and caption lengths")
    s.add_argument("dir", help="training folder")
    s.add_argument("--caption-fallback", help="as in training: folder, filename or a template with {folder}, {stem}")
    s.add_argument("--tokenizer", help="CLIP tokenizer folder for exact caption lengths (default: an estimate)")
    s.add_argument("--plot", metavar="FILE.png", help="write the charts to this PNG (outside DIR)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    s.add_argument("--json", action="store_true", help="machine-readable statistics on stdout")
    training(s)
    common(s)
    s.set_defaults(func=stats_command)

    e = sub.add_parser("caption", help="bulk-edit sidecar captions, or write them with a local model (--model)",
                       description="Edit sidecar captions in bulk (every changed file is backed up first), or, with "
                       "--model, write captions with a local captioning model: a transformers captioner (BLIP, "
                       "BLIP-2, Florence-2, Qwen2-VL, Qwen2.5-VL, LLaVA/JoyCaption) or a WD tagger (model.onnx + "
                       "selected_tags.csv). Models are never downloaded.",
                       epilog="examples:\n"
                       "  imglora-data caption data --trigger sks --dry-run\n"
                       "  imglora-data caption data --model models/wd-vit-tagger-v3 --trigger sks --threshold 0.4\n"
                       "  imglora-data caption data --model models/Florence-2-large --prompt '<CAPTION>'\n"
                       "  imglora-data caption data --model models/Qwen2.5-VL-3B-Instruct --limit 5 --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("dir", help="training folder whose captions to edit or write")
    e.add_argument("--trigger", help="trigger word put in front of every caption (unless already there)")
    e.add_argument("--prefix", help="same as --trigger, for any text")
    e.add_argument("--extension", default=".txt", help="caption extension to create (existing .txt/.caption "
                   "files are edited where they are; default: %(default)s)")
    e.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    common(e, workers=False)
    ed = e.add_argument_group("editing captions")
    ed.add_argument("--replace", action="append", default=[], metavar="OLD=NEW", help="replace a tag (repeatable)")
    ed.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove a tag (repeatable)")
    ed.add_argument("--dedupe", action="store_true", help="remove repeated tags")
    ed.add_argument("--create-missing", metavar="filename|folder|TEMPLATE",
                    help="write captions for images without one ({folder} and {stem} in a template)")
    ed.add_argument("--restore", metavar="BACKUP", help="undo an edit: put back the files of this backup folder")
    g = e.add_argument_group("writing captions with a model (--model)",
                             "Images that already have a caption are skipped unless --overwrite or --append.")
    g.add_argument("--model", metavar="MODEL_DIR", help="local model folder: a transformers captioner (config.json) "
                   "or a WD tagger (model.onnx + selected_tags.csv)")
    g.add_argument("--overwrite", action="store_true", help="replace existing captions (backed up)")
    g.add_argument("--append", action="store_true", help="add the new caption after the existing one")
    g.add_argument("--limit", type=positive(int), metavar="N", help="caption at most N images (try a prompt first)")
    g.add_argument("--batch-size", type=positive(int), help="images per model call (default: 16 for a tagger, "
                   "8 for a transformers model on a GPU, 2 on a CPU)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto, a GPU if there is one)")
    t = e.add_argument_group("transformers captioners")
    t.add_argument("--prompt", help="the instruction for chat models (Qwen, LLaVA), the task for Florence-2 "
                   "(e.g. '<CAPTION>', '<MORE_DETAILED_CAPTION>'), a text prefix for BLIP (default: per family; "
                   "Florence-2 '<DETAILED_CAPTION>')")
    t.add_argument("--max-new-tokens", type=positive(int), help="longest caption in tokens (default: 96)")
    t.add_argument("--min-new-tokens", type=positive(int), help="shortest caption in tokens (default: none)")
    t.add_argument("--num-beams", type=positive(int), help="beam search width; 1 is greedy (default: 1)")
    t.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (default: auto: bfloat16 or float16 on a GPU, float32 on a CPU)")
    w = e.add_argument_group("WD taggers")
    w.add_argument("--threshold", type=float, help="confidence a general tag needs (default: 0.35)")
    w.add_argument("--character-threshold", type=float, help="confidence a character tag needs (default: 0.85)")
    w.add_argument("--exclude-tags", action="append", default=[], metavar="TAG,TAG",
                   help="tags never written, comma-separated (repeatable; 'long_hair' = 'long hair')")
    w.add_argument("--replace-underscores", action=argparse.BooleanOptionalAction,
                   help="write 'long hair' for 'long_hair' (kaomoji such as ^_^ keep theirs; default: on)")
    w.add_argument("--max-tags", type=positive(int), help="at most this many tags per image, most confident first "
                   "(default: no limit)")
    w.add_argument("--ratings", action="store_true", help="put the likeliest rating tag (general, sensitive, "
                   "questionable, explicit) first")
    e.set_defaults(func=caption_command)

    r = sub.add_parser("resize", help="write upright, flattened, resized copies into OUT")
    r.add_argument("dir", help="training folder to read")
    r.add_argument("out", help="folder to write the copies into")
    r.add_argument("--max-side", type=positive(int), help="shrink so that the longer side is at most this "
                   "(default: no limit)")
    r.add_argument("--buckets", type=positive(int), metavar="RESOLUTION",
                   help="scale and centre-crop to the trainer's buckets at this resolution")
    r.add_argument("--bucket-step", type=positive(int), default=64, help="with --buckets: bucket side step in "
                   "pixels (default: %(default)s)")
    r.add_argument("--no-upscale", action="store_true", help="with --buckets: small images keep their size")
    r.add_argument("--background", type=colour, default=(255, 255, 255), metavar="COLOUR",
                   help="colour that transparency is flattened onto (default #ffffff)")
    r.add_argument("--format", default="keep", choices=["keep", "png", "jpg", "webp"],
                   help="keep: JPEG stays JPEG, everything else becomes PNG (default: %(default)s)")
    r.add_argument("--quality", type=percent, default=95, help="JPEG/WebP quality (default: %(default)s)")
    r.add_argument("--overwrite", action="store_true", help="replace files that already exist in OUT")
    common(r)
    r.set_defaults(func=resize_command)

    v = sub.add_parser("convert", help="between metadata.jsonl and sidecar captions (kohya folders too)")
    v.add_argument("dir", help="training folder")
    v.add_argument("--to", required=True, choices=["jsonl", "sidecar"],
                   help="jsonl: metadata.jsonl per folder; sidecar: one caption file beside each image")
    v.add_argument("--out", help="write a converted copy here (images hard-linked or copied); DIR is untouched")
    v.add_argument("--one-file", action="store_true", help="with --to jsonl: one metadata.jsonl at the top")
    v.add_argument("--dry-run", action="store_true", help="show what would be written")
    v.add_argument("--overwrite", action="store_true", help="replace existing caption files (backed up)")
    v.set_defaults(func=convert_command)

    y = sub.add_parser("synth", help="generate a synthetic captioned dataset")
    y.add_argument("kind", choices=["shapes"], help="kind of dataset: shapes (coloured shapes, captioned)")
    y.add_argument("out", help="new or empty folder to write it into")
    y.add_argument("--n", type=positive(int), default=100, help="number of images (default: %(default)s)")
    y.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    y.add_argument("--size", type=positive(int), default=64, help="image side in pixels (default: %(default)s)")
    y.add_argument("--shapes", nargs="+", help="shapes to draw (default: the base shapes)")
    y.add_argument("--colours", nargs="+", help="shape colours to use (default: all)")
    y.add_argument("--backgrounds", nargs="+", help="background colours to use (default: all)")
    y.add_argument("--word", action="append", default=[], metavar="SHAPE=WORD", help="caption a shape as WORD")
    y.add_argument("--distractor", metavar="MASKS", help="draw an uncaptioned distractor shape beside each shape and "
                   "write masks of the main shape into MASKS (a new folder outside OUT), for --masked-loss")
    y.set_defaults(func=synth_command)
    return p


def os_errors_as_lines(func):
    """A full disk or a read-only folder is bad input too: one line, exit 2."""
    def run(args):
        try:
            return func(args)
        except OSError as e:
            raise ImgloraError(e.strerror or str(e), "check the path, its permissions and free space",
                               path=e.filename) from None
    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, os_errors_as_lines(args.func), args)


if __name__ == "__main__":
    sys.exit(main())
