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

    assert parse_prompt(text) == (clean, found)


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
    from ui.tabs.adapters import card_markdown

    adapter, _ = load_adapter(ui_files["adapters"] / "style_a.safetensors")
    tags = {"data/5_zorbly": {"zorbly": 12, "red circle": 7, "<script>": 1}, "reg": {"red circle": 3}}
    save_adapter(session.catalogue.folder / "tagged.safetensors", adapter, metadata={
        "ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "zorbly", "ss_tag_frequency": json.dumps(tags)})
    save_adapter(session.catalogue.folder / "badjson.safetensors", adapter, metadata={"ss_tag_frequency": "{oops"})
    session.catalogue.scan()
    card = card_markdown(session.catalogue, "tagged")
    assert card.startswith("**tagged** · SD 1.x · kohya · 28 modules")
    assert "- rank: 4; alpha: 2" in card and "- unet: attn2.to_k ×4" in card and "q_proj ×3" in card
    assert "- trigger words: `zorbly`" in card
    assert "- top tags: zorbly (12), red circle (10), &lt;script&gt; (1)" in card  # metadata is shown as text
    assert "warning: metadata ss_tag_frequency is not valid JSON" in card_markdown(session.catalogue, "badjson")


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
    assert prune(session.catalogue, blend) == {}  # what the page does when the list changes


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


def test_a_file_replaced_on_disk_is_reloaded_at_the_next_generation(session, ui_files, expected):
    import shutil

    folder = session.catalogue.folder
    shutil.copy(ui_files["adapters"] / "style_b.safetensors", folder / "swap.safetensors")
    session.catalogue.scan()
    items, _, _ = run(session, blend_of(swap=0.7))
    assert same_image(items[0][0], expected({"style_b": 0.7}))
    data = (ui_files["adapters"] / "style_a.safetensors").read_bytes()
    (folder / "swap.safetensors").write_bytes(data)
    os.utime(folder / "swap.safetensors", ns=(1, 1))  # a new fingerprint even within one mtime tick
    session.catalogue.scan()
    items, _, _ = run(session, blend_of(swap=0.7))
    assert same_image(items[0][0], expected({"style_a": 0.7}))
