"""Block weights, step schedules and the overlap warning in the app's handlers, checked against the library."""

import json
import shutil

import pytest
from PIL import Image
from ui_helpers import SETTINGS, pixels, same_image

from imglora.errors import ImgloraError
from imglora.lora.blocks import BLOCKS26, block_weights
from imglora.lora.schedule import Schedule
from imglora.lora.state import Blend


@pytest.fixture
def library(reference):
    """library(Blend, prompt=..., seed=...) -> imglora.generate's own image with that Blend, on the second
    pipeline; its adapters are left on at weight 0, as the `expected` fixture needs them."""
    from imglora.generate import GenerateArgs, generate

    model, adapters = reference

    def make(blend: Blend, prompt: str = "a red circle", seed: int = 0, **kw):
        try:
            return generate(model, GenerateArgs(prompt, seed=seed, blend=blend, **{**SETTINGS, **kw}), adapters)[0]
        finally:
            adapters.apply(Blend({n: 0.0 for n in adapters.names}))
    return make


def run(session, blend, prompt="a red circle", **kw):
    from ui.tabs.generate import run_generate

    return run_generate(session, blend, prompt, **{**SETTINGS, **kw})


def row(session, name, weight=1.0, te=None, blocks=None, schedule=None, blend=None):
    """What an adapter row's controls do: enable at a weight, then the block preset or editor, then the steps."""
    from ui.blend import set_adapter, set_options

    new = set_adapter(session.catalogue, blend, name, True, weight, te)
    return set_options(session.catalogue, new, name, blocks=blocks, schedule=schedule)


# Tiny-model blocks: style_a has modules in BASE, IN03, M00, OUT00 and OUT01; style_b in IN03, M00, OUT00, OUT01.
CUSTOM = {"BASE": 0.5, "IN03": 1.0, "M00": 0.0, "OUT00": 1.5, "OUT01": 0.25}


def editor(session, values: dict) -> str:
    """The spec the block editor's number boxes give (the blocks this model has; unset ones at 1)."""
    from ui.tabs.adapters import blocks_from_editor, model_blocks

    shown = model_blocks(session)
    return blocks_from_editor(shown, [values.get(b, 1.0) for b in shown])


def test_the_prompt_syntax_and_the_row_controls_give_the_same_blend(session):
    from ui.blend import active_weights, parse_prompt, set_adapter, summary
    from ui.tabs.adapters import model_blocks

    cat = session.catalogue
    assert model_blocks(session) == ["BASE", "IN00", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"]

    def from_prompt(prompt, blend=None):
        text, tags = parse_prompt(prompt)
        assert text == "a cat"
        return active_weights(cat, blend, tags)

    panel = active_weights(cat, row(session, "style_a", 0.8, blocks="IND", schedule="stop=1:start=0"))
    assert panel.blocks == {"style_a": block_weights("IND")} and panel.schedules == {"style_a": Schedule(0, 1)}
    assert panel.key() == from_prompt("a cat <lora:style_a:0.8:lbw=IND:start=0:stop=1>").key()
    assert summary(panel) == "style_a 0.8 (blocks IND; steps start=0:stop=1)"

    # A separate text-encoder weight, custom block weights from the editor, LBW's step=A-B.
    spec = editor(session, CUSTOM)
    panel = active_weights(cat, row(session, "style_a", 0.8, te=0.3, blocks=spec, schedule="step=1-2"))
    # The editor shows this model's blocks (unset boxes at 1); the blocks it lacks are 0, as in LBW's lists.
    want = tuple(CUSTOM.get(b, 1.0 if b in model_blocks(session) else 0.0) for b in BLOCKS26)
    assert panel.blocks["style_a"] == want and panel.te_weights == {"style_a": 0.3}
    assert panel.key() == from_prompt(f"a cat <lora:style_a:0.3:0.8:lbw={spec}:step=1-2>").key()

    # loractl keyframes are the UNet weight itself; the text encoder takes step 0's.
    panel = active_weights(cat, row(session, "style_b", 0.7, schedule="0@0, 1@1"))
    assert panel.weights == {"style_b": 0.0} and panel.schedules["style_b"].keys == ((0.0, 0.0), (1.0, 1.0))
    assert panel.key() == from_prompt("a cat <lora:style_b:0@0,1@1>").key()

    # A weight slider keeps the row's block weights and steps; the whole prompt tag overrides the row.
    blend = row(session, "style_a", 0.8, blocks="OUTD", schedule="stop=1")
    moved = set_adapter(cat, blend, "style_a", True, 1.2, keep_file=True)
    assert moved["style_a"]["blocks"] == "OUTD" and moved["style_a"]["schedule"] == "stop=1"
    assert from_prompt("a cat <lora:style_a:0.5>", moved) == Blend({"style_a": 0.5})
    # The editor at all ones is no block weights; a preset back to "off" clears them.
    assert editor(session, {}) == "" and row(session, "style_a", blocks="off")["style_a"]["blocks"] is None


@pytest.mark.parametrize("prompt, message", [
    ("<lora:style_a:1:lbw=ABC>", "block weights 'ABC': give a preset"),
    ("<lora:style_a:1:lbw=1,2,3>", "or 12, 17, 20 or 26 numbers, not 3"),
    ("<lora:style_a:1:stop=x>", "stop='x': give a whole step number"),
    ("<lora:style_a:1:foo=2>", "unknown option foo="),
    ("<lora:style_a:1:2:3>", "too many weights"),
    ("<lora:style_a:1:lbw=" + ",".join(["99"] * 17) + ">", "block weights must lie between -10 and 10"),
    ("<lora:style_a:99>", "the weight must be a number from -10 to 10"),
    ("<lora:../secret:1:lbw=ALL>", "not an adapter name"),
])
def test_a_bad_option_is_one_clear_line(session, prompt, message):
    with pytest.raises(ImgloraError, match=message) as e:
        run(session, {}, prompt=f"a cat {prompt}")
    assert "\n" not in str(e.value)


def test_bad_row_controls_are_messages_and_leave_the_blend_as_it_was(session):
    from ui.blend import set_options

    blend = row(session, "style_a", 0.8, blocks="IND")
    for kw, message in ((dict(blocks="1,2"), "give a preset"), (dict(schedule="0.5"), "'0.5' is not a step option"),
                        (dict(schedule="te=1"), "not a step option"), (dict(schedule="stop=-1"), "0 or more")):
        with pytest.raises(ImgloraError, match=message):
            set_options(session.catalogue, blend, "style_a", **kw)
    assert blend["style_a"]["blocks"] == "IND" and blend["style_a"]["schedule"] is None
    with pytest.raises(ImgloraError, match="not in your blend"):
        set_options(session.catalogue, blend, "style_b", blocks="ALL")


def test_block_weights_and_schedules_give_the_librarys_image_and_png_info_gives_them_back(session, library):
    from ui.tabs.generate import send_to_generate

    spec = editor(session, CUSTOM)
    blend = row(session, "style_b", -0.5, blocks="ALL", blend=row(session, "style_a", 0.8, blocks=spec))
    want = Blend({"style_a": 0.8, "style_b": -0.5},
                 blocks={"style_a": block_weights(spec), "style_b": block_weights("ALL")})
    plain, _, _ = run(session, row(session, "style_b", -0.5, blend=row(session, "style_a", 0.8)))
    loaded = dict(session.loaded)
    items, _, text = run(session, blend)
    image = library(want)
    assert same_image(items[0][0], image) and abs(pixels(image) - pixels(plain[0][0])).max() > 10  # they matter
    assert session.loaded == loaded  # block weights are numbers: nothing is loaded again
    params = Image.open(items[0][0]).text["parameters"]
    assert params.startswith(f"a red circle <lora:style_a:0.8:lbw={spec}> <lora:style_b:-0.5:lbw=ALL>\nSteps: 2")
    assert "(blocks ALL)" in text
    merged, _, _ = run(session, blend, merge=True)  # merged: the block weights are folded in
    assert session.adapters.merged and same_image(merged[0][0], image, tol=2)

    # A schedule: style_b only for the first step, style_a's weight by keyframes. Merge is not possible: it
    # stays at run time, and says so.
    blend = row(session, "style_b", 1.0, schedule="stop=1", blend=row(session, "style_a", 1.0, schedule="0.2@0,1@1"))
    want = Blend({"style_a": 0.2, "style_b": 1.0}, schedules={"style_a": Schedule(keys=((0.2, 0.0), (1.0, 1.0))),
                                                             "style_b": Schedule(stop=1)})
    items, _, text = run(session, blend, merge=True, seed=4)
    assert not session.adapters.merged and "not merged: a step schedule" in text
    assert same_image(items[0][0], library(want, seed=4))
    assert abs(pixels(items[0][0]) - pixels(library(Blend({"style_a": 0.2, "style_b": 1.0}), seed=4))).max() > 10
    params = Image.open(items[0][0]).text["parameters"]
    assert "<lora:style_a:0.2@0,1@1> <lora:style_b:1:stop=1>" in params

    # PNG info: the tags come back as the blend, blocks and steps included, and make the same image.
    settings, new, _ = send_to_generate(session, {}, params)
    assert {n: (v["weight"], v["blocks"], v["schedule"]) for n, v in new.items()} == {
        "style_a": (0.2, None, "0.2@0,1@1"), "style_b": (1.0, None, "stop=1")}
    again, _, _ = run(session, new, **{k: v for k, v in settings.items() if k != "scheduler"})
    assert same_image(again[0][0], items[0][0], tol=0)
    settings, new, _ = send_to_generate(session, {}, f"a cat <lora:style_a:0.8:lbw={spec}:start=1>\nSteps: 2")
    assert (new["style_a"]["blocks"], new["style_a"]["schedule"]) == (spec, "start=1")
    _, new, notes = send_to_generate(session, {}, "a cat <lora:style_a:0.8:lbw=BAD>\nSteps: 2")
    assert new == {} and "block weights 'BAD'" in notes


def test_export_and_bake_fold_block_weights_in_and_refuse_a_schedule(session, library):
    from imglora.generate import GenerateArgs, generate
    from imglora.pipeline import load_model
    from ui.tabs.export import bake_model, export_adapter

    spec = editor(session, CUSTOM)
    blend = row(session, "style_b", -0.5, te=0.3, blocks="ALL", blend=row(session, "style_a", 0.8, blocks=spec))
    want = library(Blend({"style_a": 0.8, "style_b": -0.5}, {"style_b": 0.3},
                         {"style_a": block_weights(spec), "style_b": block_weights("ALL")}))
    path = session.catalogue.folder / "blocks_exact.safetensors"
    baked = session.outputs / "models" / "blocks_baked"
    try:
        assert "blocks_exact.safetensors" in export_adapter(session, blend, "blocks_exact")
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            sources = json.loads(f.metadata()["imglora.merged_from"])
        assert [s.get("blocks") for s in sources] == [spec, "ALL"]
        items, _, _ = run(session, {"blocks_exact": {"on": True, "weight": 1.0, "te": None}})
        assert same_image(items[0][0], want, tol=2)

        bake_model(session, blend, "blocks_baked")
        image = generate(load_model(baked), GenerateArgs("a red circle", seed=0, **SETTINGS))[0]
        assert same_image(image, want, tol=2) and not session.adapters.merged

        timed = row(session, "style_b", 1.0, schedule="stop=1", blend=blend)
        for act in (lambda: export_adapter(session, timed, "timed"), lambda: bake_model(session, timed, "timed")):
            with pytest.raises(ImgloraError, match=r"^style_b \(stop=1\): a step schedule cannot be exported or "
                                                   "baked — clear its steps field") as e:
                act()
            assert "\n" not in str(e.value)
        assert not (session.catalogue.folder / "timed.safetensors").exists()
        assert not (session.outputs / "models" / "timed").exists()
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(baked, ignore_errors=True)
        session.catalogue.scan()


def test_compare_sweeps_block_presets_and_schedules_in_one_batch(session, library):
    from ui.tabs.compare import run_grid

    base = row(session, "style_b", 0.5)
    grid, cells, notes = run_grid(session, base, "a red circle", x_name="style_a", x_kind="blocks",
                                  x_values="NONE, ALL, IND", seed=3, **SETTINGS)
    assert "3 images in one batch" in notes and "X: style_a blocks NONE, ALL, IND" in notes
    images = [library(Blend({"style_b": 0.5, "style_a": 1.0}, blocks={"style_a": block_weights(p)}), seed=3)
              for p in ("NONE", "ALL", "IND")]
    assert [label for _, label in cells] == ["style_a NONE", "style_a ALL", "style_a IND"]
    for (image, _), want in zip(cells, images):
        assert same_image(image, want)
    assert min(abs(pixels(a) - pixels(b)).max() for a, b in ((images[0], images[1]), (images[1], images[2]))) > 3
    assert "Grid: X: style_a blocks NONE, ALL, IND" in Image.open(grid).text["parameters"]

    # Schedules on Y (';' between values that hold commas), style_b's weight on X.
    _, cells, notes = run_grid(session, base, "a red circle", x_name="style_b", x_values="0, 1", y_name="style_a",
                               y_kind="steps", y_values="stop=1; 0@0,1@1", seed=3, **SETTINGS)
    assert "4 images in one batch" in notes
    schedules = [Schedule(stop=1), Schedule(keys=((0.0, 0.0), (1.0, 1.0)))]
    for (image, label), (b, s) in zip(cells, [(b, s) for s in schedules for b in (0, 1)]):
        assert label == f"style_b {b}, style_a {'stop=1' if s.stop else '0@0,1@1'}"
        want = Blend({"style_b": float(b), "style_a": s.keys[0][0] if s.keys else 1.0}, schedules={"style_a": s})
        assert same_image(image, library(want, seed=3))
    with pytest.raises(ImgloraError, match="block weights 'BAD'"):
        run_grid(session, base, "x", x_name="style_a", x_kind="blocks", x_values="ALL, BAD", **SETTINGS)


def test_two_identical_adapters_get_the_overlap_warning_once_per_pair_of_files(session, ui_files, audit_opens):
    from ui.tabs.adapters import overlap_warnings

    folder, cache = session.catalogue.folder, {}
    twin = folder / "twin_a.safetensors"
    shutil.copy(ui_files["adapters"] / "style_a.safetensors", twin)
    try:
        session.catalogue.scan()
        blend = row(session, "twin_a", blend=row(session, "style_a"))
        text = overlap_warnings(session, blend, cache)
        assert text == ("style_a and twin_a overlap strongly (cosine) in BASE +1.00, IN03 +1.00, M00 +1.00, "
                        "OUT00 +1.00, OUT01 +1.00: stacked, they push the same directions; lower one of them there "
                        "(block weights) or its weight")
        del audit_opens[:]
        # Computed once per pair of files: a new weight or block weights reads nothing again, and a block
        # that one of them leaves out is no longer named.
        blend = row(session, "twin_a", 0.4, blocks=editor(session, {"BASE": 0, "IN03": 0}), blend=blend)
        assert "in M00 +1.00, OUT00 +1.00, OUT01 +1.00:" in overlap_warnings(session, blend, cache)
        assert not [p for p in audit_opens if p.endswith(".safetensors")]
        assert overlap_warnings(session, row(session, "twin_a", blocks="NONE", blend=blend), cache) == ""
        assert overlap_warnings(session, row(session, "style_b", blend=row(session, "style_a")), cache) == ""
    finally:
        twin.unlink()
        session.catalogue.scan()


def test_the_api_sets_block_weights_and_steps_and_generates_with_them(client, library):
    s = SETTINGS
    client.predict("style_a", True, 0.8, None, api_name="/set_adapter")
    text = client.predict("style_a", "IND", "stop=1", api_name="/set_options")
    assert text == "style_a 0.8 (blocks IND; steps stop=1)"
    images, _, text = client.predict("a red circle", "", s["steps"], s["guidance"], 0, False, s["width"], s["height"],
                                     "model default", 1, False, api_name="/generate")
    assert "<lora:style_a:0.8:lbw=IND:stop=1>" in text
    want = Blend({"style_a": 0.8}, blocks={"style_a": block_weights("IND")}, schedules={"style_a": Schedule(stop=1)})
    assert same_image(images[0]["image"], library(want))
    text = client.predict("style_a", "", None, api_name="/set_options")  # "" clears, None keeps
    assert text == "style_a 0.8 (steps stop=1)"
