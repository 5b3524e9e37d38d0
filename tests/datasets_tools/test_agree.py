"""`imglora-data check`, `stats` and `imglora train` agree: one minimum side, one bucket rule, the model's
resolution."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_helpers import shape
from datasets_tools.cli import build_parser, main
from imglora.config import TrainConfig
from imglora.data import MIN_IMAGE_SIDE
from imglora.train.data import build_data


def _defaults(command: str) -> dict:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a.default for a in sub._actions}


def test_one_minimum_side_for_check_stats_and_training():
    assert TrainConfig().min_image_side == MIN_IMAGE_SIDE
    assert _defaults("check")["min_side"] == _defaults("stats")["min_side"] == MIN_IMAGE_SIDE


def mixed_folder(root: Path) -> Path:
    """Sizes of every shape, one too small, one uncaptioned, a repeat folder and a year folder."""
    sizes = {"square": (96, 96), "wide": (200, 90), "tall": (70, 150), "small": (40, 40), "tiny": (20, 20),
             "big": (300, 300), "pano": (256, 64)}
    root.mkdir()
    for name, size in sizes.items():
        shape(size=size, seed=len(name)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} picture")
    shape(size=(96, 96), seed=30).save(root / "uncaptioned.png")
    for folder, n in (("3_rep", 2), ("2024_photos", 2)):
        (root / folder).mkdir()
        for i in range(n):
            shape(size=(120 + 40 * i, 80), seed=40 + i).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text("in a folder")
    return root


def trainer_buckets(root: Path, resolution: int, **cfg) -> dict[str, int]:
    data = build_data(TrainConfig(data=str(root), max_bad=1.0, **cfg), resolution, log=lambda _: None)
    return {f"{w}x{h}": n for (w, h), n in sorted(Counter(e.bucket for e in data.examples).items())}


@pytest.mark.parametrize("flags,cfg", [
    ([], {}),  # the embedded model's 64 px, step 64
    (["--resolution", "128", "--bucket-step", "32"], {"bucket_step": 32}),
    (["--resolution", "128", "--bucket-step", "16", "--no-upscale"], {"bucket_step": 16, "no_upscale": True}),
    (["--resolution", "96", "--bucket-step", "8", "--min-bucket", "40", "--max-bucket", "160"],
     {"bucket_step": 8, "min_bucket": 40, "max_bucket": 160}),
])
def test_stats_buckets_are_the_trainers(tmp_path, capsys, flags, cfg):
    root = mixed_folder(tmp_path / "d")
    assert main(["stats", str(root), "--json", "--quiet", *flags]) == 0
    stats = json.loads(capsys.readouterr().out)
    resolution = int(flags[1]) if flags else 64
    assert stats["resolution"] == resolution
    assert stats["buckets"] == trainer_buckets(root, resolution, **cfg)
    skipped = {Path(i["path"]).name: i["skipped"] for i in stats["per_image"] if "skipped" in i}
    assert set(skipped) == {"tiny.png", "uncaptioned.png"}  # what training skips is in no bucket
    assert "too small (20x20, under 32 px)" in skipped["tiny.png"]
    if not flags:
        assert stats["buckets"] == {"64x64": 14}  # 6 usable top-level images, 2 x 3 repeats, 2 year-folder images


def test_stats_and_check_use_the_models_resolution(tmp_path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    for i in range(3):
        shape(size=(100, 100), seed=i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a picture")
    model = tmp_path / "model"
    model.mkdir()
    (model / "imglora.json").write_text(json.dumps({"resolution": 512}))  # the file the trainer reads too
    assert main(["stats", str(root), "--json", "--quiet", "--model", str(model)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["resolution"] == 512 and stats["buckets"] == {"512x512": 3} and stats["upscaled"] == 3
    # At the embedded model's 64 px these images shrink; at 512 px they train enlarged 5x, which check says.
    assert main(["check", str(root), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["check", str(root), "--quiet", "--json", "--model", str(model)]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["reason"] for p in problems] == ["trains enlarged 5.1x (100x100 into the 512x512 bucket at 512 px): "
                                               "blurry"] * 3
    assert all(p["severity"] == "warning" and "--no-upscale" in p["fix"] for p in problems)
    assert main(["check", str(root), "--quiet", "--model", str(model), "--no-upscale"]) == 0
    capsys.readouterr()


def test_stats_plots_caption_lengths_as_a_png(tmp_path, capsys):
    from datasets_tools.stats import figure, folder_stats

    root = mixed_folder(tmp_path / "d")
    stats = folder_stats(root, progress=False)
    fig = figure(stats)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["image sizes", "buckets at 64 px", "caption length", "top tags"]
    lengths = fig.axes[2]
    assert sum(p.get_height() for p in lengths.patches) == 11  # every captioned image, once
    plot = tmp_path / "plot.png"
    assert main(["stats", str(root), "--quiet", "--plot", str(plot)]) == 0
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.width > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically: no temp file left
    capsys.readouterr()
    assert main(["stats", str(root), "--quiet", "--plot", str(tmp_path / "plot.jpg")]) == 2
    assert "give it a name ending in .png" in capsys.readouterr().err


def test_check_says_what_it_decided_about_folders(tmp_path, capsys):
    root = tmp_path / "d"
    for seed, folder in enumerate(("2024_photos", "10_cats")):
        (root / folder).mkdir(parents=True)
        shape(size=(64, 64), seed=seed).save(root / folder / "a.png")
        (root / folder / "a.txt").write_text("a picture")
    assert main(["check", str(root), "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: folder {root / '10_cats'}: 10 repeats",
                   f"note: folder {root / '2024_photos'}: not a repeat folder (2024 repeats is implausible; repeat "
                   "folders have 1 to 1000); its images count once",
                   f"{root}: 2 images, no problems found"]
    assert main(["check", str(root), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [line[len("note: "):] for line in err[:2]]
