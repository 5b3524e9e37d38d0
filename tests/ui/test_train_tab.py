"""The Train tab's handlers and run queue (ui/datasets.py, ui/jobs.py, ui/tabs/train.py), then the same through
the running app's API (gradio_client), as another program would use it. Real `imglora train` processes on the
embedded model, a few hundred tiny steps each."""

import argparse
import os
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from ui_helpers import FAST_RUN, pixels

from imglora.config import FIELDS, HELP_GROUPS, TrainConfig, load_config
from imglora.errors import ImgloraError
from imglora.synthetic.shapes import synth_shapes
from ui.datasets import Datasets
from ui.jobs import Jobs
from ui.tabs.train import APP_FIELDS, FORM, form_values, read_settings, settings_of, to_toml

FAST = read_settings(FAST_RUN)[0]
# Dataset, image and run names that must never reach a file outside the roots.
ESCAPES = ["../outside", "/etc", "..", ".", "", "a/../../outside", "x\x00", "~", "%2e%2e", "a b", None]


def wait(predicate, timeout=90, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def folders(tmp_path):
    """datasets/ with good (4 captioned images), link_in (a link to good), link_out (a link outside), a file;
    and outside/ with an image and a caption of its own."""
    root, outside = tmp_path / "datasets", tmp_path / "outside"
    synth_shapes(root / "good", 4, size=32)
    synth_shapes(outside, 1, size=32)
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a dataset")
    os.symlink(root / "good", root / "link_in")
    os.symlink(outside, root / "link_out")
    os.symlink(outside / "00000.png", root / "good" / "escape.png")  # an image that leads out of the dataset
    return Datasets(root), outside


# -- the settings form ---------------------------------------------------------------------------------
def test_the_form_is_the_trainers_config_and_its_toml_is_what_imglora_train_reads(tmp_path):
    # Every field is in the form except those the app decides, each once, in HELP_GROUPS' order.
    grouped = [n for names in HELP_GROUPS.values() for n in names]
    assert FORM == [n for n in grouped if n not in APP_FIELDS] and set(FORM) | set(APP_FIELDS) >= set(FIELDS)
    assert settings_of(*form_values({})) == {}  # the defaults are the trainer's own
    settings = {**FAST, "targets": "attn", "train_text_encoder": True, "sample_prompts": ["a", "b c"]}
    values = form_values(settings)
    assert settings_of(*values) == settings
    text = to_toml(settings)
    assert read_settings(text)[0] == settings
    # The same text is a config file `imglora train --config` takes (flags override; data from the command line).
    (tmp_path / "run.toml").write_text(text)
    cfg = load_config(argparse.Namespace(config=str(tmp_path / "run.toml"), data="photos"))
    assert cfg == TrainConfig(data="photos", **settings)

    # What the app decides is refused when starting a run, and left out (named) when loading a file.
    hostile = text + 'cache_dir = "/tmp/elsewhere"\noutput = "/"\n'
    with pytest.raises(ImgloraError, match="cache_dir, output cannot be set here"):
        read_settings(hostile)
    assert read_settings(hostile, strict=False) == (settings, ["cache_dir", "output"])
    for bad, message in (("rank = 0", "--rank must be at least 1"), ("ranks = 4", "unknown config key 'ranks'"),
                         ('targets = "all"', "must be one of cross-attn"), ("steps = 1.5", "must be int"),
                         ("steps = [", "invalid TOML")):
        with pytest.raises(ImgloraError, match=message):
            read_settings(bad)
    with pytest.raises(ImgloraError, match="whole number"):
        settings_of(*[2.5 if n == "steps" else v for n, v in zip(FORM, form_values({}))])


# -- the datasets folder -------------------------------------------------------------------------------
def test_datasets_are_listed_by_name_and_no_name_reaches_outside(tmp_path):
    datasets, outside = folders(tmp_path)
    assert datasets.names() == ["good", "link_in"]  # not hidden, not a file, not a link out of the root
    for name in ESCAPES + ["link_out", str(outside), str(datasets.root / "good")]:
        with pytest.raises(ImgloraError):
            datasets.path(name)
        with pytest.raises(ImgloraError):
            datasets.save_caption(name, "00000.png", "x")
    pictures = datasets.pictures("good")
    assert [p.rel for p in pictures] == ["00000.png", "00001.png", "00002.png", "00003.png"]  # not escape.png
    items, rels, total = datasets.thumbnails("good")
    assert rels == [p.rel for p in pictures] and total == 4 and max(items[0][0].size) <= 128
    assert items[0][1] == pictures[0].caption
    before = {p: p.read_bytes() for p in outside.iterdir()}
    for rel in ["escape.png", "../../outside/00000.png", str(outside / "00000.png"), "00000.txt", "", None]:
        with pytest.raises(ImgloraError):
            datasets.save_caption("good", rel, "pwned")
    # A caption file that is a link out of the dataset is not written through, nor replaced.
    os.symlink(outside / "00000.txt", datasets.root / "good" / "00003.txt.tmp")
    os.replace(datasets.root / "good" / "00003.txt.tmp", datasets.root / "good" / "00003.txt")
    with pytest.raises(ImgloraError, match="link"):
        datasets.save_caption("good", "00003.png", "pwned")
    assert {p: p.read_bytes() for p in outside.iterdir()} == before


def test_a_caption_edit_is_one_line_backed_up_and_undoable(tmp_path):
    from datasets_tools.caption import restore

    datasets, _ = folders(tmp_path)
    side = datasets.root / "good" / "00001.txt"
    old = side.read_text()
    message = datasets.save_caption("link_in", "00001.png", "  a red\nzorbly  ")  # through the link: same folder
    assert side.read_text() == "a red zorbly\n" and "--restore .imglora-backup/" in message
    backup = datasets.root / "good" / message.split("--restore ")[1].rstrip(")")
    assert (backup / "00001.txt").read_text() == old
    assert datasets.save_caption("good", "00001.png", "a red zorbly") == "00001.png: unchanged"
    for text in ("", "   ", "x" * 3000, "a\x00b"):
        with pytest.raises(ImgloraError):
            datasets.save_caption("good", "00001.png", text)
    restore(datasets.root / "good", backup)
    assert side.read_text() == old


def test_the_captioner_loads_once_for_many_folders_and_not_for_a_captioned_one(train_files, tmp_path, monkeypatch):
    from datasets_tools import autocaption as module
    from ui import datasets as ds

    loads = []
    real = module.load_captioner
    monkeypatch.setattr(module, "load_captioner", lambda path, **kw: loads.append(path) or real(path, **kw))
    monkeypatch.setattr(ds, "_LOADED", {})
    datasets = Datasets(tmp_path)
    for name in ("one", "two"):
        synth_shapes(tmp_path / name, 3, seed=4, size=64)
        for caption in (tmp_path / name).glob("*.txt"):
            caption.unlink()
    captioners = train_files["captioners"]
    assert "3 image(s) captioned" in ds.autocaption(datasets, "one", captioners, "tagger")
    assert "3 image(s) captioned" in ds.autocaption(datasets, "two", captioners, "tagger")
    assert ds.autocaption(datasets, "two", captioners, "tagger").startswith("0 image(s) captioned, 3 skipped")
    assert len(loads) == 1 and all((tmp_path / "two" / f"{i:05d}.txt").read_text().strip() for i in range(3))


# -- the run queue, alone --------------------------------------------------------------------------------
def test_runs_queue_one_after_another_and_their_adapters_join_the_folder_under_a_free_name(tmp_path):
    data = tmp_path / "data"
    synth_shapes(data, 6, size=32)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mine = adapters / "first.safetensors"
    mine.write_bytes(b"a user's own file")  # never replaced
    jobs = Jobs(tmp_path / "outputs", adapters)
    cfg = TrainConfig(data=str(data), **{**FAST, "steps": 6, "sample_every": 3, "val_every": 3})
    try:
        first, second = jobs.submit("first", cfg), jobs.submit("second", cfg)
        assert second.state == "queued" and jobs.current() is first
        with pytest.raises(ImgloraError, match="already a run named"):
            jobs.submit("first", cfg)
        for name in ESCAPES:
            with pytest.raises(ImgloraError):
                jobs.submit(name, cfg)
        assert sorted(p.name for p in (tmp_path / "outputs" / "runs").iterdir()) == ["first", "second"]
        wait(lambda: first.state == "running", what="the first run")
        assert second.state == "queued"  # one at a time
        wait(lambda: second.state == "finished", what="both runs")
    finally:
        jobs.shutdown()
    assert first.state == "finished", first.message
    assert mine.read_bytes() == b"a user's own file" and first.adapter == "first_2"
    assert os.path.samefile(adapters / "first_2.safetensors", first.final)
    assert second.adapter == "second" and jobs.published == 2
    p = first.progress()
    assert (p.step, p.total, len(p.loss)) == (6, 6, 6) and [s.name for s in p.samples] == ["step-0000003.png",
                                                                                          "step-0000006.png"]
    assert p.val_loss and p.val_loss[-1][0] == 6
    # A restarted app finds its runs in the folder.
    again = Jobs(tmp_path / "outputs", adapters)
    assert {n: r.state for n, r in again.runs.items()} == {"first": "finished", "second": "finished"}
    assert read_settings(to_toml({k: v for k, v in again.get("first").settings.items() if k not in APP_FIELDS}))[0] \
        == {**FAST, "steps": 6, "sample_every": 3, "val_every": 3}


# -- the same through the API -----------------------------------------------------------------------------
def status(client, name):
    _, text, table, plot, samples, tail = client.predict(name, api_name="/run_status")
    return text, table, plot, samples


def until(client, name, words: str, timeout=90) -> str:
    """The run's status line, once it holds `words`."""
    def check():
        text = status(client, name)[0]
        return text if words in text else None
    return wait(check, timeout, f"{name!r} to say {words!r}")


def test_api_dataset_captions_run_stop_resume_and_the_new_adapter_changes_the_image(train_app):
    url, datasets, outside = train_app["url"], train_app["datasets"], train_app["outside"]
    client = Client(url, verbose=False)
    note = client.predict(api_name="/make_demo_dataset")[0]
    assert "demo-zorbly" in note and {"demo-shapes", "demo-zorbly"} <= {p.name for p in datasets.iterdir()}
    findings, stats, thumbs, *_ = client.predict("demo-zorbly", api_name="/dataset")
    assert findings.startswith("60 images; no problems found") and "64x64      60" in stats
    assert len(thumbs) == 60 and thumbs[0]["caption"] == (datasets / "demo-zorbly" / "00000.txt").read_text().strip()
    assert "saved 00000.txt" in client.predict("demo-zorbly", "00000.png", "a red zorbly on a white background",
                                               api_name="/save_caption")
    (outside / "x.png").write_bytes((datasets / "demo-zorbly" / "00001.png").read_bytes())
    os.symlink(outside, datasets / "leak")
    for call, args in (("/dataset", ("../outside",)), ("/dataset", ("leak",)), ("/dataset", (str(outside),)),
                       ("/save_caption", ("demo-zorbly", "../../outside/x.png", "x")),
                       ("/save_caption", ("leak", "x.png", "x")),
                       ("/start_run", ("../outside", "", "r1", FAST_RUN)),
                       ("/start_run", ("demo-zorbly", "leak", "r1", FAST_RUN)),
                       ("/start_run", ("demo-zorbly", "", "../r1", FAST_RUN)),
                       ("/start_run", ("demo-zorbly", "", "r1", FAST_RUN + 'cache_dir = "/tmp/x"\n'))):
        with pytest.raises(AppError):
            client.predict(*args, api_name=call)
    assert not (outside / "x.txt").exists() and not (train_app["outputs"] / "runs" / "r1").exists()

    message, run = client.predict("demo-zorbly", "", "api_run", FAST_RUN, api_name="/start_run")
    assert run == "api_run" and "queued api_run" in message
    wait(lambda: "step 0/" not in status(client, "api_run")[0] and "running" in status(client, "api_run")[0],
         what="the first steps")
    assert "stopping" in client.predict("api_run", api_name="/stop_run")
    text = until(client, "api_run", "stopped:")
    assert "checkpoint step-" in text, text
    stopped_at = int(text.split("step ")[1].split("/")[0])
    assert 0 < stopped_at < 200
    # A second client (another tab, another program) sees the same run: it lives in the server.
    other = Client(url, verbose=False)
    assert status(other, "api_run")[0] == text
    assert "queued" in other.predict("api_run", api_name="/resume_run")
    text = until(client, "api_run", "finished:", 120)
    _, table, plot, samples = status(client, "api_run")
    assert "step 200/200" in text and "in the adapters list as api_run" in text
    assert table["data"][0][:3] == ["api_run", "finished", "200/200"]
    curves = {}
    for step, loss, series in plot["data"]:
        curves.setdefault(series, []).append(step)
    assert curves["loss"] == list(range(1, 201)) and curves["validation loss"] == [50, 100, 150, 200]
    assert samples[0]["caption"] == "step 200"

    # The adapter is in the adapters list, ready to blend: it changes the image.
    listed = {row[0]: row[1] for row in client.predict(api_name="/refresh")["data"]}
    assert listed["api_run"] == "ok"
    base = client.predict("a red circle on a white background", "", 4, 4.0, 0, False, 64, 64, "model default", 1,
                          False, api_name="/generate")[0][0]["image"]
    client.predict("api_run", True, 1.0, None, api_name="/set_adapter")
    tuned = client.predict("a red circle on a white background", "", 4, 4.0, 0, False, 64, 64, "model default", 1,
                           False, api_name="/generate")[0][0]["image"]
    assert abs(pixels(base) - pixels(tuned)).max() > 5
