"""The app's handlers called as plain functions (no server, no browser), checked against the library."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from ui_helpers import SETTINGS, same_image

from imglora.errors import ImgloraError


def blend_of(**weights):
    """blend_of(style_a=0.8, style_b=(0.5, 0.2)) -> the gr.State dict the page keeps."""
    out = {}
    for name, w in weights.items():
        w, te = w if isinstance(w, tuple) else (w, None)
        out[name] = {"on": True, "weight": w, "te": te}
    return out


def outputs_now(session):
    return set(os.listdir(session.outputs)) if session.outputs.exists() else set()


def test_the_folder_is_listed_with_a_reason_for_every_unusable_file(session):
    rows = {r[0]: r for r in (e.row() for e in session.catalogue.scan())}
    assert {"style_a", "style_b", "huge"} <= {n for n, r in rows.items() if r[1] == "ok"}
    assert "incomplete safetensors" in rows["broken"][1]
    assert "incompatible: made for SDXL" in rows["foreign"][1]
    assert "outside the adapters folder" in rows["escape"][1]
    assert "notes" not in rows  # only .safetensors files are adapters


def test_an_adapter_for_another_width_is_listed_unusable_with_the_reason(session, ui_files):
    """Same family (sd1) and key names, but one layer is wider than this model's: listed with the misfit,
    not "ok", and never counted usable (the shape check reads only the header)."""
    from safetensors.torch import save_file

    tensors = load_file(ui_files["adapters"] / "style_b.safetensors")
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[down] = torch.cat([tensors[down], tensors[down]], dim=1)
    path = ui_files["adapters"] / "wider.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    try:
        rows = {r[0]: r for r in (e.row() for e in session.catalogue.scan())}
        assert rows["wider"][1].startswith("does not fit this model: module unet.") and "do not fit" in rows["wider"][1]
        assert rows["wider"][2] == "SD 1.x" and "wider" not in session.catalogue.names()
        assert rows["style_b"][1] == "ok"
    finally:
        path.unlink()
        session.catalogue.scan()


def test_a_blend_gives_the_librarys_image_and_the_png_records_it(session, expected):
    blend = blend_of(style_a=0.8, style_b=-0.5)
    items, seed, text = run(session, blend)
    assert seed == 0 and same_image(items[0][0], expected({"style_a": 0.8, "style_b": -0.5}))
    params = Image.open(items[0][0]).text["parameters"]
    assert params.startswith("a red circle <lora:style_a:0.8> <lora:style_b:-0.5>\nSteps: 2, Sampler: DDIM")
    assert "Seed: 0, Size: 32x32" in params
    # A weight is just a number: the next generation uses the new one, nothing is reloaded.
    loaded = dict(session.loaded)
    items, _, _ = run(session, blend_of(style_a=1.5, style_b=-0.5))
    assert same_image(items[0][0], expected({"style_a": 1.5, "style_b": -0.5}))
    assert session.loaded == loaded


def test_the_a1111_prompt_syntax_enables_adapters_by_name(session, expected):
    items, _, text = run(session, {}, prompt="a red circle <lora:style_b:0.7>")
    assert same_image(items[0][0], expected({"style_b": 0.7}))
    assert text.startswith("a red circle <lora:style_b:0.7>")
    # <lora:name:te:unet>: A1111's order; the prompt's tag overrides the blend for that adapter.
    items, _, _ = run(session, blend_of(style_a=0.3), prompt="a red circle <lora:style_a:0.2:0.9>")
    assert same_image(items[0][0], expected({"style_a": (0.9, 0.2)}))


def test_separate_text_encoder_weight_and_merge_mode(session, expected):
    want = expected({"style_a": (0.6, -0.4)})
    items, _, _ = run(session, blend_of(style_a=(0.6, -0.4)))
    assert same_image(items[0][0], want)
    items, _, _ = run(session, blend_of(style_a=(0.6, -0.4)), merge=True)
    assert same_image(items[0][0], want, tol=2) and session.adapters.merged
    items, _, _ = run(session, {})  # back to runtime mode: the exact base weights again
    assert not session.adapters.merged and same_image(items[0][0], expected({}), tol=0)


def test_a_grid_is_one_batch_equal_to_single_generations(session, expected):
    from ui.tabs.compare import run_grid

    grid, cells, notes = run_grid(session, blend_of(style_b=0.5), "a red circle", x_name="style_a",
                                  x_values="0, 1", y_name="style_b", y_values="-1, 1", seed=3, **SETTINGS)
    assert "4 images in one batch" in notes
    for (image, label), (a, b) in zip(cells, [(0, -1), (1, -1), (0, 1), (1, 1)]):
        assert label == f"style_a {a}, style_b {b}"
        assert same_image(image, expected({"style_a": a, "style_b": b}, seed=3))
    # Labelled: a caption strip under each image, and a column wide enough for the longest row label.
    from PIL import ImageDraw

    width, height = Image.open(grid).size
    label_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("style_b -1")
    assert height == 2 * (32 + 14) and 2 * 32 + label_width < width < 2 * 32 + label_width + 20
    assert "Grid: X: style_a 0, 1; Y: style_b -1, 1" in Image.open(grid).text["parameters"]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_output_is_a_message_and_nothing_is_saved(session):
    from ui.session import NonFinite

    before = outputs_now(session)
    with pytest.raises(NonFinite, match="NaN or Inf"):
        run(session, blend_of(huge=1.0))
    assert outputs_now(session) == before


def test_images_are_numbered_and_never_overwritten(session):
    session.outputs.mkdir(parents=True, exist_ok=True)
    taken = session.outputs / "imglora-00500.png"
    taken.write_bytes(b"someone's file")
    items, _, _ = run(session, {})
    assert os.path.basename(items[0][0]) == "imglora-00501.png"
    assert taken.read_bytes() == b"someone's file"


def test_bad_settings_and_unknown_adapters_are_messages(session):
    with pytest.raises(ImgloraError, match="multiple of 8"):
        run(session, {}, width=33)
    with pytest.raises(ImgloraError, match="no adapter named 'nope'"):
        run(session, {}, prompt="x <lora:nope:1>")
    with pytest.raises(ImgloraError, match="incompatible: made for SDXL"):
        run(session, {}, prompt="x <lora:foreign:1>")
    with pytest.raises(ImgloraError, match="out of range"):
        run(session, blend_of(style_a=1e9))


@pytest.mark.parametrize("text, clean, found", [
    ("a cat <lora:x:0.5>, best", "a cat , best", {"x": (0.5, None)}),
    ("<lora:x> a cat", "a cat", {"x": (1.0, None)}),
    ("a <LORA:x:0.25:1> cat", "a cat", {"x": (1.0, 0.25)}),
    ("a cat", "a cat", {}),
])
def test_prompt_tags_are_parsed(text, clean, found):
    from ui.blend import parse_prompt

    got, options = parse_prompt(text)
    assert (got, {n: (o.weight, o.te) for n, o in options.items()}) == (clean, found)


def test_the_blend_exports_as_one_adapter_that_gives_the_same_image(session, expected):
    from ui.tabs.export import export_adapter

    blend = blend_of(style_a=0.8, style_b=(-0.5, 0.3))
    message = export_adapter(session, blend, "blended_exact")
    assert "blended_exact.safetensors" in message and "exact concatenation" in message
    path = session.catalogue.folder / "blended_exact.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sources = json.loads(meta["imglora.merged_from"])
    assert [(s["name"], s["weight"], s["te_weight"]) for s in sources] == [("style_a", 0.8, 0.8),
                                                                            ("style_b", -0.5, 0.3)]
    assert meta["modelspec.merged_from"] == "style_a.safetensors, style_b.safetensors"
    items, _, _ = run(session, blend_of(blended_exact=1.0))
    assert same_image(items[0][0], expected({"style_a": 0.8, "style_b": (-0.5, 0.3)}), tol=2)
    message = export_adapter(session, blend, "blended_svd", method="svd", rank=2)
    assert "retained energy" in message and load_file(session.catalogue.folder / "blended_svd.safetensors")
    with pytest.raises(ImgloraError, match="already exists"):
        export_adapter(session, blend, "blended_exact")


def test_baking_saves_a_diffusers_folder_and_leaves_the_live_pipeline_as_it_was(session, expected):
    from imglora.generate import GenerateArgs, generate
    from imglora.pipeline import load_model
    from ui.tabs.export import bake_model

    before, _, _ = run(session, {})
    n_layers = len(session.adapters.layers)
    message = bake_model(session, blend_of(style_a=0.8, style_b=-0.5), "baked")
    folder = session.outputs / "models" / "baked"
    assert str(folder) in message and (folder / "model_index.json").is_file()
    baked = load_model(folder)
    image = generate(baked, GenerateArgs("a red circle", seed=0, **SETTINGS))[0]
    assert same_image(image, expected({"style_a": 0.8, "style_b": -0.5}), tol=2)
    assert not any("lora" in k.lower() or ".base." in k for k in baked.pipe.unet.state_dict())
    after, _, _ = run(session, {})
    assert same_image(after[0][0], before[0][0], tol=0) and len(session.adapters.layers) == n_layers
    items, _, _ = run(session, blend_of(style_a=0.8))  # the adapters are still loaded and work
    assert same_image(items[0][0], expected({"style_a": 0.8}))


def run(session, blend, prompt="a red circle", **kw):
    from ui.tabs.generate import run_generate

    return run_generate(session, blend, prompt, **{**SETTINGS, **kw})


def test_bad_uploads_are_messages_and_nothing_lands_in_the_folder(session, ui_files, tmp_path):
    import io
    import struct

    import torch
    from safetensors.torch import save

    from ui.tabs.adapters import upload_adapter

    good = (ui_files["adapters"] / "style_a.safetensors").read_bytes()
    pickle = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, pickle)
    bad = {  # RELIABILITY.md U3: junk, oversize and the F1-F5 files
        "junk.safetensors": b"this is not a tensor file at all",
        "empty.safetensors": b"",
        "cut.safetensors": good[: len(good) // 2],
        "trailing.safetensors": good + b"\0\0",
        "lfs.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
        "pickle.safetensors": pickle.getvalue(),
        "bomb.safetensors": struct.pack("<Q", 2**40) + b"{}",
        "nan.safetensors": save({"lora_unet_x.lora_down.weight": torch.tensor([[float("nan")]])}),
        "dup.safetensors": _duplicate_key_file(),
        "big.safetensors": good + b" " * (2 * 2**20),  # over the 1 MB limit of this session
        "weights.pt": good,
        "sdxl.safetensors": (ui_files["adapters"] / "foreign.safetensors").read_bytes(),
    }
    before = sorted(os.listdir(session.catalogue.folder))
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImgloraError) as e:
            upload_adapter(session, str(tmp_path / name))
        assert e.value.path == name, e.value  # the message names the file the user chose
    assert sorted(os.listdir(session.catalogue.folder)) == before  # no temp file left either

    (tmp_path / "my style.safetensors").write_bytes(good)
    assert "'my_style'" in upload_adapter(session, str(tmp_path / "my style.safetensors"))
    assert "'my_style_2'" in upload_adapter(session, str(tmp_path / "my style.safetensors"))  # never replaced
    assert {"my_style", "my_style_2"} <= set(session.catalogue.names())


def _duplicate_key_file() -> bytes:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = b'{"a":' + entry + b',"a":' + entry + b'}'
    return len(header).to_bytes(8, "little") + header + b"\0" * 4


def test_uploads_are_off_when_served_beyond_this_machine_without_a_login(ui_files):
    from ui.app import network_policy
    from ui.session import Session
    from ui.tabs.adapters import upload_adapter

    assert network_policy("127.0.0.1", None, False) == (True, None)
    assert network_policy("localhost", None, False) == (True, None)
    assert network_policy("0.0.0.0", "me:secret", False) == (True, None)
    for host, share in (("0.0.0.0", False), ("192.168.1.5", False), ("127.0.0.1", True)):
        uploads, warning = network_policy(host, None, share)
        assert not uploads and "Uploads are disabled" in warning and "--auth" in warning
    closed = Session.__new__(Session)
    closed.uploads_enabled = False
    with pytest.raises(ImgloraError, match="uploads are disabled"):
        upload_adapter(closed, str(ui_files["adapters"] / "style_a.safetensors"))


def test_the_card_shows_base_model_rank_targets_trigger_words_and_top_tags(session, ui_files):
    from imglora.formats.lora_file import load_adapter, save_adapter
    from ui.tabs.adapters import card_text

    adapter, _ = load_adapter(ui_files["adapters"] / "style_a.safetensors")
    tags = {"data/5_zorbly": {"zorbly": 12, "red circle": 7, "<script>": 1}, "reg": {"red circle": 3}}
    save_adapter(session.catalogue.folder / "tagged.safetensors", adapter, metadata={
        "ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "zorbly", "ss_tag_frequency": json.dumps(tags)})
    save_adapter(session.catalogue.folder / "badjson.safetensors", adapter, metadata={"ss_tag_frequency": "{oops"})
    session.catalogue.scan()
    card = card_text(session.catalogue, "tagged")
    assert card.startswith("tagged · SD 1.x · kohya · 28 modules") and "- file: tagged.safetensors" in card
    assert "- rank: 4; alpha: 2" in card and "- unet: attn2.to_k ×4" in card and "q_proj ×3" in card
    assert "- trigger words: zorbly" in card
    # Metadata is shown as it is written: plain text in a Textbox, never Markdown, so no escaping either.
    assert "- top tags: zorbly (12), red circle (10), <script> (1)" in card
    assert "warning: metadata ss_tag_frequency is not valid JSON" in card_text(session.catalogue, "badjson")
    # The search box matches trigger words and tags read from the header, not only names.
    assert "zorbly" in session.catalogue.entries["tagged"].keywords


def test_an_adapter_that_left_the_folder_can_still_be_switched_off(session, ui_files):
    import shutil

    from ui.blend import prune, set_adapter

    shutil.copy(ui_files["adapters"] / "style_b.safetensors", session.catalogue.folder / "leaving.safetensors")
    session.catalogue.scan()
    blend = set_adapter(session.catalogue, {}, "leaving", True, 0.5)
    (session.catalogue.folder / "leaving.safetensors").unlink()
    session.catalogue.scan()
    with pytest.raises(ImgloraError, match="no adapter named 'leaving'"):
        run(session, blend)
    assert set_adapter(session.catalogue, blend, "leaving", False, 0.5) == {}
    assert prune(session.catalogue, blend) == ({}, ["leaving"])  # what the page does when the list changes


def test_sdxl_pipelines_blend_the_same_way(tmp_path):
    import copy

    import torch

    from imglora.formats.lora_file import save_adapter
    from imglora.pipeline import attach, model_of
    from imglora.generate import GenerateArgs, generate
    from imglora.lora.adapters import Adapters
    from imglora.models.tiny import tiny_sdxl_pipeline
    from ui.session import Session

    pipe = tiny_sdxl_pipeline(tmp_path / "build")
    reference = copy.deepcopy(pipe)
    adapters = Adapters(copy.deepcopy(pipe))
    params = adapters.create("x", adapters.targets("attn", text_encoder=True), rank=2)
    for p in params:
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.3
    adapter = adapters.export("x")
    adapter.arch = "sdxl"
    save_adapter(tmp_path / "adapters" / "xl.safetensors", adapter, layers_per_block=2)
    session = Session(model_of(pipe), tmp_path / "adapters", tmp_path / "outputs")
    items, _, text = run(session, blend_of(xl=(0.7, 0.4)))
    ref = Adapters(reference)
    attach(model_of(reference), ref, tmp_path / "adapters" / "xl.safetensors", weight=0.7, te_weight=0.4, name="xl")
    want = generate(model_of(reference), GenerateArgs("a red circle", seed=0, **SETTINGS), ref)[0]
    assert same_image(items[0][0], want) and "<lora:xl:0.4:0.7>" in text


def test_a_name_that_comes_to_mean_another_file_is_dropped_from_the_blend_not_used(session, ui_files, expected):
    """A blend holds a name and the file version it was enabled with; when a rescan gives the name to
    another file (replaced in place, another file moved onto it, or a name shifted between folders), the
    blend is refused with a message and pruned. Enabling the name again takes the file now there."""
    import shutil

    from ui.blend import prune, set_adapter
    from ui.catalogue import Replaced

    folder, catalogue = session.catalogue.folder, session.catalogue
    a, b = ui_files["adapters"] / "style_a.safetensors", ui_files["adapters"] / "style_b.safetensors"
    made = [folder / "swap.safetensors", folder / "fresh.safetensors", folder / "one", folder / "two"]
    try:
        shutil.copy(b, folder / "swap.safetensors")
        catalogue.scan()
        blend = set_adapter(catalogue, {}, "swap", True, 0.7)
        items, _, _ = run(session, blend)
        assert same_image(items[0][0], expected({"style_b": 0.7}))

        (folder / "swap.safetensors").write_bytes(a.read_bytes())  # replaced in place: same inode, new bytes
        catalogue.scan()
        with pytest.raises(Replaced, match="'swap' is not the file you enabled: swap.safetensors was replaced"):
            run(session, blend)
        moved = set_adapter(catalogue, blend, "swap", True, 0.9, keep_file=True)  # a slider keeps the old file
        with pytest.raises(Replaced):
            run(session, moved)
        assert prune(catalogue, blend) == ({}, ["swap"])
        blend = set_adapter(catalogue, {}, "swap", True, 0.7)  # enabled again: the file in the folder now
        items, _, _ = run(session, blend)
        assert same_image(items[0][0], expected({"style_a": 0.7}))

        shutil.copy(b, folder / "other.safetensors")
        os.replace(folder / "other.safetensors", folder / "swap.safetensors")  # another file renamed onto the name
        catalogue.scan()
        with pytest.raises(Replaced):
            run(session, blend)

        for sub in ("one", "two"):  # one/dup -> "dup", two/dup -> "dup_2"; without one/dup, two/dup is "dup"
            (folder / sub).mkdir()
            shutil.copy(a if sub == "one" else b, folder / sub / "dup.safetensors")
        catalogue.scan()
        shifted = set_adapter(catalogue, {}, "dup", True, 0.5)
        (folder / "one" / "dup.safetensors").unlink()
        catalogue.scan()
        assert catalogue.entries["dup"].path == folder / "two" / "dup.safetensors"
        with pytest.raises(Replaced):
            run(session, shifted)
        assert prune(catalogue, shifted) == ({}, ["dup"])

        # Changed after the listing and not loaded yet: refused too, until the folder is listed again.
        shutil.copy(b, folder / "fresh.safetensors")
        catalogue.scan()
        blend = set_adapter(catalogue, {}, "fresh", True, 0.5)
        (folder / "fresh.safetensors").write_bytes(a.read_bytes())
        with pytest.raises(ImgloraError, match="changed on disk since the folder was listed"):
            run(session, blend)
    finally:
        for path in made:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        catalogue.scan()


def test_heavy_requests_are_refused_before_they_wait_for_the_model(session):
    from ui.tabs.compare import run_grid

    limits = session.limits
    for kw, message in ((dict(steps=limits.steps + 1), f"use 1 to {limits.steps} steps"),
                        (dict(width=limits.side + 8), f"multiple of 8 from 16 to {limits.side}"),
                        (dict(batch=limits.images + 1), f"use 1 to {limits.images}"),
                        (dict(batch=limits.images, width=1024, height=1024), "megapixels in one batch, over the limit")):
        with pytest.raises(ImgloraError, match=message):
            run(session, {}, **kw)
    with pytest.raises(ImgloraError, match="9 cells of 1024x1024 is 9.4 megapixels"):
        run_grid(session, {}, "x", x_name="style_a", x_values="0, 1, 2", y_name="style_b", y_values="0, 1, 2",
                 **{**SETTINGS, "width": 1024, "height": 1024})
    assert "100 steps, 1536 px a side, 8 images and 8 megapixels" in limits.text()


@pytest.fixture
def slow_steps(session):
    """Every UNet call (one per step) takes at least 0.1 s; yields the list of step times."""
    import time

    times = []

    def slow(module, args):
        times.append(time.monotonic())
        time.sleep(0.1)
    handle = session.pipe.unet.register_forward_pre_hook(slow)
    yield times
    handle.remove()


def test_a_generation_past_the_time_limit_is_stopped_and_saves_nothing(session, slow_steps):
    import time

    from ui.session import Job, Stopped

    before, seconds = outputs_now(session), session.limits.seconds
    session.limits.seconds = 0.5
    reports = []
    try:
        start = time.monotonic()
        with pytest.raises(Stopped, match=r"stopped at step \d+/40: this request needs about \d+ s, over the limit"):
            run(session, {}, steps=40, job=Job(report=lambda *r: reports.append(r)))
        assert time.monotonic() - start < 2 and len(slow_steps) < 8  # stopped by its pace, not after 40 steps
    finally:
        session.limits.seconds = seconds
    assert outputs_now(session) == before
    assert reports[0][1:] == (0, 40) and any("s left" in text for text, _, _ in reports)
    run(session, {})  # the model is free again


def test_interrupt_stops_a_running_generation_at_the_next_step(session, slow_steps):
    import threading

    from ui.session import Job, Stopped

    job = Job("someone")
    stopper = threading.Thread(target=lambda: (_wait_for(lambda: len(slow_steps) >= 3),
                                               session.turns.interrupt("someone")))
    stopper.start()
    with pytest.raises(Stopped, match=r"interrupted at step [34] of 30"):
        run(session, {}, steps=30, job=job)
    stopper.join()
    assert session.turns.interrupt("someone") == 0  # nothing of theirs is left running or waiting


def _wait_for(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_users_take_turns_round_robin_and_each_may_queue_only_a_few():
    """User A holds the model with a pile of requests behind; B's one request goes next, not last."""
    import threading

    from ui.session import Job, Stopped, Turns

    turns, order, gate, errors = Turns(per_user=2), [], threading.Event(), []

    def request(user, tag, hold=False):
        try:
            with turns.turn(Job(user)):
                order.append(tag)
                if hold:
                    gate.wait(10)
        except (ImgloraError, Stopped) as e:
            errors.append((tag, str(e)))

    threads = []
    for user, tag in (("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("A", "a4"), ("C", "c1")):
        threads.append(threading.Thread(target=request, args=(user, tag, tag == "a1")))
        threads[-1].start()
        _wait_for(lambda: order == ["a1"] and len(turns._waiting) + len(errors) == len(threads) - 1)
    assert errors == [("a4", "you already have 2 requests waiting for the model — wait for them to finish, "
                              "or press Interrupt")]
    assert turns.interrupt("C") == 1  # a waiting request leaves the queue at once
    _wait_for(lambda: len(errors) == 2)
    assert errors[1] == ("c1", "interrupted while waiting for its turn — nothing was saved")
    gate.set()
    for t in threads:
        t.join(10)
    assert order == ["a1", "b1", "a2", "a3"]


def test_png_info_reads_the_parameters_and_they_make_the_same_image(session, tmp_path):
    from ui.blend import set_adapter
    from ui.pnginfo import parse_parameters, read_parameters
    from ui.tabs.generate import send_to_generate

    blend = set_adapter(session.catalogue, {}, "style_a", True, 0.6, -0.3)
    items, _, _ = run(session, blend, prompt="a red circle, <lora:style_b:0.4>", negative="blurry", seed=5, batch=2)
    text = read_parameters(items[1][0])
    assert parse_parameters(text)["Seed"] == "6" and parse_parameters(text)["negative"] == "blurry"
    settings, new, message = send_to_generate(session, {"style_b": {"on": True, "weight": 1.0}}, text)
    assert settings == {"prompt": "a red circle", "negative": "blurry", "steps": 2, "guidance": 3.0, "seed": 6,
                        "width": 32, "height": 32, "scheduler": "model default"}
    assert {n: (v["weight"], v["te"]) for n, v in new.items()} == {"style_a": (0.6, -0.3), "style_b": (0.4, None)}
    assert "replaced by the image's" in message
    again, _, _ = run(session, new, **{k: v for k, v in settings.items() if k != "scheduler"})
    assert same_image(again[0][0], items[1][0], tol=0)

    # A1111's text, with an adapter this folder lacks and a sampler it does not have.
    a1111 = ("masterpiece, <lora:missing_style:0.8> cat\nNegative prompt: ugly\nSteps: 28, Sampler: DPM++ SDE, "
             'Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 512x768, Model hash: abc, Lora hashes: "x: 1, y: 2"')
    settings, new, message = send_to_generate(session, {}, a1111)
    assert settings["prompt"] == "masterpiece, cat" and (settings["width"], settings["height"]) == (512, 768)
    assert new == {} and "missing_style (not usable here)" in message and "Sampler 'DPM++ SDE'" in message
    assert parse_parameters(a1111)["Lora hashes"] == "x: 1, y: 2"

    (tmp_path / "fake.png").write_bytes(b"<html>not a png</html>")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png", format="JPEG")
    for name in ("fake.png", "photo.png"):
        with pytest.raises(ImgloraError, match="not a PNG image"):
            read_parameters(tmp_path / name)
    with pytest.raises(ImgloraError, match="no generation parameters"):
        send_to_generate(session, {}, "")


def test_two_files_with_the_same_token_take_turns_and_each_draws_with_its_own_vectors(tmp_path):
    """Two runs that both trained "zorbly": enabling one frees the token from the other (one file's tokens at a
    time, never the other file's vectors under this one's name); both in one blend is a message, and
    neither file is marked broken."""
    from imglora.formats.lora_file import save_adapter
    from imglora.generate import GenerateArgs, generate
    from imglora.lora.adapters import Adapters
    from imglora.pipeline import attach, load_model
    from ui.session import Session, TokenInUse, open_model

    width = load_model(None).pipe.text_encoder.config.hidden_size
    for i, name in enumerate(("v1", "v2")):
        adapters = Adapters(load_model(None).pipe)
        for p in adapters.create("x", adapters.targets("cross-attn", text_encoder=True), rank=2):
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2
        vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(10 + i))
        save_adapter(tmp_path / "adapters" / f"{name}.safetensors", adapters.export("x"),
                     embeddings={"zorbly": {"text_encoder": vectors}})
    prompt = "a red zorbly on a white background"

    def alone(name):  # the reference: a fresh model with only this file attached
        model = load_model(None)
        adapters = Adapters(model.pipe)
        attach(model, adapters, tmp_path / "adapters" / f"{name}.safetensors", name=name)
        return generate(model, GenerateArgs(prompt, seed=0, **SETTINGS), adapters)[0]

    session = Session(open_model(None), tmp_path / "adapters", tmp_path / "outputs")
    for name in ("v1", "v2", "v1"):
        items, _, _ = run(session, blend_of(**{name: 1.0}), prompt=prompt)
        assert same_image(items[0][0], alone(name)), name
    with pytest.raises(TokenInUse, match="'v1' and 'v2' both bring the token 'zorbly'"):
        run(session, blend_of(v1=1.0, v2=0.5), prompt=prompt)
    assert all(session.catalogue.get(n).error is None for n in ("v1", "v2"))
    assert not same_image(alone("v1"), alone("v2"))  # the vectors differ, so the turns above could fail
