"""`imglora-data caption --model`: tiny random models of every family, built from configs here (never
downloaded), and a tiny ONNX tagger whose scores are set by its weights, so its tags are known exactly."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_helpers import exit_code, tree_hash
from datasets_tools.autocaption import Tagger, caption_folder, load_captioner
from datasets_tools.cli import main
from imglora.formats.files import TMP_MARK

RED, BLUE = (255, 0, 0), (0, 0, 255)


def one_line_error(capsys, *words):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("imglora-data: ") and all(w in err[0] for w in words), err
    assert "Traceback" not in err[0]


def no_leftovers(folder):
    assert not [p for p in folder.rglob("*") if TMP_MARK in p.name]


# -- a WD tagger whose scores are known ---------------------------------------------------------------
# (name, category, score = base + (b*B + g*G + r*R) / 255 over the image's mean BGR, clipped to 0..1)
TAGS = [
    ("general", 9, 0.70, 0, 0, 0), ("sensitive", 9, 0.20, 0, 0, 0), ("questionable", 9, 0.05, 0, 0, 0),
    ("explicit", 9, 0.01, 0, 0, 0),
    ("smile", 0, 0.34, 0, 0, 0),  # just under the default 0.35
    ("solo", 0, 0.95, 0, 0, 0),
    ("looking_at_viewer", 0, 0.36, 0, 0, 0),  # just over it
    ("red_theme", 0, 0.25, -0.5, 0, 0.5),  # 0.75 on red, 0 on blue: catches RGB fed as BGR
    ("^_^", 0, 0.52, 0, 0, 0),  # a kaomoji: keeps its underscore
    ("simple_background", 0, 0.60, 0, 0, 0),
    ("white_background", 0, 0.0, 0, 0.9, 0),  # 0.45 on a wide red image padded with white, 0 with black
    ("long_hair", 0, 0.80, 0, 0, 0),
    ("kagamine_rin", 4, 0.80, 0, 0, 0),  # under the default character threshold 0.85
    ("hatsune_miku_(vocaloid)", 4, 0.86, 0, 0, 0),
]


def tiny_tagger(folder, size=32, batch="N"):
    """model.onnx + selected_tags.csv in SmilingWolf's layout: NHWC BGR 0-255 in, one sigmoid-like score per tag."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([[t[3], t[4], t[5]] for t in TAGS], np.float32).T / 255  # (3 BGR, tags)
    base = np.array([t[2] for t in TAGS], np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["mixed"]),
         helper.make_node("Add", ["mixed", "base"], ["raw"]),
         helper.make_node("Clip", ["raw", "lo", "hi"], ["predictions_sigmoid"])],
        "tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(base, "base"),
         numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(1, np.float32), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        w.writerows([i, t[0], t[1], 1000 - i] for i, t in enumerate(TAGS))
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return tiny_tagger(tmp_path_factory.mktemp("models") / "wd-tagger")


RED_SQUARE = "hatsune miku (vocaloid), solo, long hair, red theme, simple background, ^_^, looking at viewer"
# padded with white to a square: half the pixels white, so red_theme 0.5 and white_background 0.45
RED_WIDE = "hatsune miku (vocaloid), solo, long hair, simple background, ^_^, red theme, white background, " \
           "looking at viewer"


def test_tagger_thresholds_order_exclusions_and_underscores(tagger_dir):
    red, wide = Image.new("RGB", (48, 48), RED), Image.new("RGB", (64, 32), RED)
    clear = Image.new("RGBA", (20, 40), (0, 0, 0, 0))  # transparent: white, not its hidden black
    tagger = load_captioner(tagger_dir)
    assert isinstance(tagger, Tagger) and tagger.size == 32
    assert tagger.caption([red, wide, clear]) == [
        RED_SQUARE, RED_WIDE,
        "hatsune miku (vocaloid), solo, white background, long hair, simple background, ^_^, looking at viewer"]
    assert tagger.caption([Image.new("RGB", (32, 32), BLUE)])[0].count("red theme") == 0
    scores = dict(tagger.tags_of([red])[0])
    assert scores["solo"] == pytest.approx(0.95) and scores["red theme"] == pytest.approx(0.75, abs=1e-3)

    strict = load_captioner(tagger_dir, threshold=0.5, character_threshold=0.7, ratings=True,
                            exclude_tags=["long hair", "Simple_Background"], replace_underscores=False)
    assert strict.caption([red]) == ["general, hatsune_miku_(vocaloid), kagamine_rin, solo, red_theme, ^_^"]
    assert load_captioner(tagger_dir, max_tags=3).caption([red]) == ["hatsune miku (vocaloid), solo, long hair"]

    # a model exported for a fixed batch of 1 runs any number of images
    fixed = load_captioner(tiny_tagger(tagger_dir.parent / "fixed", batch=1))
    assert fixed.caption([red, wide, red]) == [RED_SQUARE, RED_WIDE, RED_SQUARE]


def dataset(root, captions: dict):
    """Images named by `captions` (red squares; 'wide' ones 2:1), with a caption file where the value is text."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, text in captions.items():
        Image.new("RGB", (64, 32) if "wide" in stem else (40, 40), RED).save(root / f"{stem}.png")
        if text is not None:
            (root / f"{stem}.txt").write_text(text)
    return root


def test_tagger_cli_skips_overwrites_appends_with_backups_and_dry_run(tmp_path, tagger_dir, capsys):
    d = dataset(tmp_path / "data", {"a": None, "b": "my old caption, solo", "c-wide": None})
    (d / "broken.png").write_bytes(b"not an image")
    args = ["caption", str(d), "--model", str(tagger_dir), "--quiet"]

    before = tree_hash(d)
    assert main([*args, "--trigger", "sks", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert tree_hash(d) == before  # a dry run writes nothing
    assert f"+sks, {RED_SQUARE}" in out and f"+sks, {RED_WIDE}" in out and "b.txt" not in out
    assert "2 image(s) would be captioned, 1 skipped (already captioned" in err and "1 failed" in err

    assert main([*args, "--trigger", "sks"]) == 0
    err = capsys.readouterr().err
    assert (d / "a.txt").read_text() == f"sks, {RED_SQUARE}\n"
    assert (d / "c-wide.txt").read_text() == f"sks, {RED_WIDE}\n"
    assert (d / "b.txt").read_text() == "my old caption, solo"  # never overwritten without --overwrite
    assert "skipped " in err and "broken.png" in err and "not a supported image" in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("2 image(s) captioned, 1 skipped (already captioned") and str(d) in summary
    backups = sorted((d / ".imglora-backup").iterdir())
    assert json.loads((backups[0] / "manifest.json").read_text())["created"] == ["a.txt", "c-wide.txt"]
    no_leftovers(d)

    (d / "broken.png").unlink()
    assert main(args) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("0 image(s) captioned, 3 skipped")

    assert main([*args, "--append"]) == 0  # only b lacks tags; a and c already hold every one
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("1 image(s) captioned, 2 skipped")
    assert (d / "b.txt").read_text() == "my old caption, solo, " + RED_SQUARE.replace(", solo", "") + "\n"

    state = {p.name: p.read_text() for p in d.glob("*.txt")}
    assert main([*args, "--overwrite", "--max-tags", "2"]) == 0
    err = capsys.readouterr().err
    assert {p.name: p.read_text() for p in d.glob("*.txt")} == dict.fromkeys(state, "hatsune miku (vocaloid), solo\n")
    backup = err.split("--restore ")[1].split(")")[0]
    assert main(["caption", str(d), "--restore", backup]) == 0
    assert {p.name: p.read_text() for p in d.glob("*.txt")} == state
    no_leftovers(d)


# -- tiny random transformers captioners ------------------------------------------------------------
WORDS = ("a an the photo picture drawing image of with on in and red blue green white black gray circle square "
         "triangle star heart cross ring shape background sky grass tree house cat dog person smiling small large "
         "bright dark soft describe this").split()


def tokenizer(specials, template=None, words=WORDS, **kw):
    """A word-level fast tokenizer, offline: every special token is one token, every word one more."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=kw["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if template:  # e.g. "[CLS] $A [SEP]", as BERT's tokenizer frames a text
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in vocab])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw), vocab


def save(model, d):
    """Save with weights large enough that the image changes the caption (initialised weights are so small
    that every image gets the same words)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(d)


def vision(**kw):
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **kw)


def build_blip(d):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok, v = tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"], "[CLS] $A [SEP]", pad_token="[PAD]",
                       unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", bos_token="[DEC]", mask_token="[MASK]")
    config = BlipConfig(vision_config=vision(image_size=16, patch_size=8), projection_dim=16,
                        text_config=vision(vocab_size=len(v), max_position_embeddings=64, bos_token_id=v["[DEC]"],
                                           pad_token_id=0, sep_token_id=v["[SEP]"], eos_token_id=v["[SEP]"]))
    save(BlipForConditionalGeneration(config), d)
    BlipProcessor(BlipImageProcessorPil(size={"height": 16, "width": 16}), tok).save_pretrained(d)


def build_blip2(d):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok, _ = tokenizer(["<pad>", "</s>", "<unk>"], "</s> $A", bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                       pad_token="<pad>")
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 16, "width": 16}), tok, num_query_tokens=4)
    n = len(tok)  # the processor added <image>
    config = Blip2Config(vision_config=vision(image_size=16, patch_size=8), num_query_tokens=4,
                         qformer_config=vision(vocab_size=n, encoder_hidden_size=16, max_position_embeddings=64),
                         text_config=dict(model_type="opt", vocab_size=n, hidden_size=16, ffn_dim=32,
                                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                                          word_embed_proj_dim=16, bos_token_id=1, eos_token_id=1, pad_token_id=0),
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    save(Blip2ForConditionalGeneration(config), d)
    processor.save_pretrained(d)


def build_florence2(d):
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok, v = tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<image>"], bos_token="<s>", pad_token="<pad>",
                       eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                   do_center_crop=False)
    images.image_seq_length = 65  # (32 / stride 4)^2 patches + 1 pooled token
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(v), max_position_embeddings=128, encoder_layers=1,
                         encoder_ffn_dim=16, encoder_attention_heads=1, decoder_layers=1, decoder_ffn_dim=16,
                         decoder_attention_heads=1, d_model=16, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=12, projection_dim=16),
        image_token_id=v["<image>"])
    save(Florence2ForConditionalGeneration(config), d)
    Florence2Processor(images, tok).save_pretrained(d)


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen(d, version):
    """As the Hub has them: preprocessor_config.json, the tokenizer and chat_template.jinja (no video processor,
    which would need torchvision)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tok, v = tokenizer(specials, words=["user", "assistant", *WORDS], pad_token="<|endoftext|>",
                       eos_token="<|im_end|>", unk_token="<|endoftext|>",
                       extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    text = dict(vocab_size=len(v), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, bos_token_id=None, eos_token_id=v["<|im_end|>"],
                pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=2, depth=1, hidden_size=16)
    if version == "2":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision_config = dict(embed_dim=16, mlp_ratio=2, **common)
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = dict(intermediate_size=16, out_hidden_size=16, window_size=28, fullatt_block_indexes=[0],
                             **common)
    config = config_class(text_config=text, vision_config=vision_config, image_token_id=v["<|image_pad|>"],
                          video_token_id=v["<|video_pad|>"], vision_start_token_id=v["<|vision_start|>"],
                          vision_end_token_id=v["<|vision_end|>"])
    save(model_class(config), d)
    tok.save_pretrained(d)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(d)
    (d / "chat_template.jinja").write_text(QWEN_TEMPLATE)


LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_llava(d):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok, v = tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s> $A", words=["USER:", "ASSISTANT:", *WORDS],
                       bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                       extra_special_tokens={"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=16, patch_size=8, projection_dim=16,
                           **vision()),
        text_config=dict(model_type="llama", vocab_size=len(v), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=v["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    save(LlavaForConditionalGeneration(config), d)
    LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tok,
                   patch_size=8, vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(d)


BUILDERS = {"blip": build_blip, "blip-2": build_blip2, "florence2": build_florence2,
            "qwen2_vl": lambda d: build_qwen(d, "2"), "qwen2_5_vl": lambda d: build_qwen(d, "2.5"),
            "llava": build_llava}


def tiny_model(root, family):
    import torch

    d = root / family
    torch.manual_seed(0)  # the same random weights every run
    BUILDERS[family](d)
    return d


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_family_captions_every_image_the_same_way_each_time(tmp_path, family, capsys):
    model = tiny_model(tmp_path, family)
    assert json.loads((model / "config.json").read_text())["model_type"] == family
    d = tmp_path / "data"
    d.mkdir()
    colours = [RED, BLUE, (0, 160, 0)]
    for i, c in enumerate(colours):
        Image.new("RGB", (24 + 8 * i, 32), c).save(d / f"{i}.png")
    args = ["caption", str(d), "--model", str(model), "--max-new-tokens", "5", "--min-new-tokens", "2",
            "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("3 image(s) captioned, 0 skipped")
    first = {p.name: p.read_text() for p in sorted(d.glob("*.txt"))}
    assert len(first) == 3 and all(text.strip() for text in first.values()), first

    again = tmp_path / "again"
    shutil.copytree(d, again)
    assert main([*args[:1], str(again), *args[2:], "--overwrite", "--trigger", "sks"]) == 0
    assert {p.name: p.read_text() for p in sorted(again.glob("*.txt"))} == {
        name: ("sks, " if "," in text else "sks ") + text for name, text in first.items()}

    # from Python, one image at a time: the same captions as the batches of two (padding does not change them)
    captioner = load_captioner(model, max_new_tokens=5, min_new_tokens=2, device="cpu")
    images = [Image.open(d / f"{i}.png") for i in range(3)]
    assert [captioner.caption([im])[0] + "\n" for im in images] == list(first.values())


def test_prompts_reach_the_model(tmp_path):
    """A prompt changes what a prompt-taking model sees: a BLIP prefix is not repeated in its caption."""
    blip = load_captioner(tiny_model(tmp_path, "blip"), max_new_tokens=4, min_new_tokens=2, prompt="a photo of")
    red = Image.new("RGB", (16, 16), RED)
    assert not blip.caption([red])[0].startswith("a photo of")
    qwen = load_captioner(tiny_model(tmp_path, "qwen2_vl"), prompt="describe this image")
    assert qwen._chat_text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe this image"
                               "<|im_end|>\n<|im_start|>assistant\n")
    # JoyCaption's template puts the image token in itself and prints a content list as text: the plain prompt
    llava = tiny_model(tmp_path, "llava")
    (llava / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {% if loop.first %}<image>\n{% endif %}{{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    joy = load_captioner(llava, prompt="describe this image", max_new_tokens=3)
    assert joy._chat_text == "USER: <image>\ndescribe this image ASSISTANT:"
    assert joy.caption([red])[0]


def test_caption_folder_loads_the_model_only_when_needed(tmp_path, tagger_dir):
    d = dataset(tmp_path / "data", {"a": "done already"})
    broken = tmp_path / "broken"
    shutil.copytree(tagger_dir, broken)
    (broken / "model.onnx").write_bytes(b"\0" * 64)  # passes the folder check, fails to load
    result = caption_folder(d, broken, progress=False)  # nothing to caption: never loaded
    assert result.changes == [] and result.skipped == [d / "a.png"]
    dataset(d, {"b": None})
    result = caption_folder(d, tagger_dir, trigger="sks", dry_run=True, progress=False,
                            options={"threshold": 0.9, "character_threshold": 0.9})
    assert result.changes == [(d / "b.txt", None, "sks, solo")] and not (d / "b.txt").exists()


def test_bad_model_folders_and_flags_are_one_line_exit_2(tmp_path, tagger_dir, capsys):
    d = dataset(tmp_path / "data", {"a": None})
    before = tree_hash(d)

    def fails(model, *words, extra=()):
        assert exit_code(["caption", str(d), "--model", str(model), "--quiet", *extra]) == 2
        one_line_error(capsys, *words)

    fails(tmp_path / "nowhere", "nowhere", "no such model folder", "never downloaded")
    fails("Salesforce/blip-image-captioning-large", "hf download Salesforce/blip-image-captioning-large")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "empty", "not a captioning model", "config.json", "model.onnx")
    only_onnx = tmp_path / "only-onnx"
    only_onnx.mkdir()
    shutil.copy(tagger_dir / "model.onnx", only_onnx)
    fails(only_onnx, "only-onnx", "missing selected_tags.csv")
    pointer = tmp_path / "pointer"
    shutil.copytree(tagger_dir, pointer)
    (pointer / "model.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    fails(pointer, "model.onnx", "Git LFS pointer")
    fails(tagger_dir, "--prompt", "only for transformers captioners", extra=["--prompt", "hi"])

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fails(fake, "fake", "model_type 'bert' is not a captioner")
    (fake / "config.json").write_text(json.dumps({"model_type": "blip",
                                                  "architectures": ["BlipForImageTextRetrieval"]}))
    fails(fake, "BlipForImageTextRetrieval", "does not write captions")
    (fake / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (fake / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    fails(fake, "fake", "missing model.safetensors", "PyTorch pickle")
    (fake / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    fails(fake, "model.safetensors", "Git LFS pointer")
    (fake / "config.json").write_text(json.dumps({"model_type": "florence2", "text_config": {
        "model_type": "florence2_language"}}))
    fails(fake, "remote code", "florence-community")

    for flags, words in ((["--overwrite"], ("--overwrite", "--model")),
                         (["--threshold", "0.5"], ("--threshold", "--model"))):
        assert exit_code(["caption", str(d), *flags]) == 2
        one_line_error(capsys, *words)
    for flags, words in ((["--replace", "a=b"], ("--replace", "two commands")),
                         (["--overwrite", "--append"], ("--overwrite and --append",)),
                         (["--threshold", "2"], ("--threshold 2.0 is not between 0 and 1",))):
        fails(tagger_dir, *words, extra=flags)
    assert tree_hash(d) == before
