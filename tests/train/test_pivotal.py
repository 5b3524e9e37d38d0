"""Pivotal tuning (`--train-embedding`): a new token trained in every text encoder, with the LoRA or alone,
bundled in the adapter as A1111 reads it and written alone for ComfyUI and diffusers; diffusers renders
what imglora renders, and only the new rows of the embedding matrix ever change."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import TRAIN_FLAGS, train_flags

from imglora.cli import main
from imglora.config import TrainConfig
from imglora.lora.adapters import Adapters
from imglora.pipeline import attach, load_model
from imglora.synthetic.shapes import synth_shapes
from imglora.train import embeddings as emb
from imglora.train.loop import Trainer

TOKEN = "zorbly"
FLAGS = {**TRAIN_FLAGS, "batch_size": 2}
RENDER = dict(num_inference_steps=2, width=32, height=32, output_type="np")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synth_shapes(d, 6, seed=2, size=32)
    return d


def config(model, data, out, **kw) -> TrainConfig:
    cfg = TrainConfig(model=str(model), data=str(data), output=str(out), train_embedding=TOKEN, trigger=TOKEN,
                      **{**FLAGS, **kw})
    cfg.check()
    return cfg


@pytest.fixture(scope="module")
def sd1_run(model_dir, shapes, tmp_path_factory):
    """4 steps of LoRA (UNet + text encoder) and a 2-vector token, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("pivotal") / "straight"
    trainer = Trainer(config(model_dir, shapes, out, steps=4, save_every=2, embedding_vectors=2,
                             embedding_init="red", train_text_encoder=True))
    trainer.run()
    return out, trainer


def render(pipe, prompt):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **RENDER).images


def test_only_the_new_rows_train_and_resume_is_exact(model_dir, shapes, sd1_run, tmp_path):
    from transformers import CLIPTextModel

    out, trainer = sd1_run
    layer = trainer.pipe.text_encoder.get_input_embeddings()
    original = CLIPTextModel.from_pretrained(model_dir / "text_encoder").get_input_embeddings().weight
    assert isinstance(layer, emb.NewTokens) and torch.equal(layer.base.weight, original)  # bit-exact
    red = original[trainer.pipe.tokenizer.convert_tokens_to_ids("red</w>")]
    assert (layer.vectors - red).abs().amax() > 1e-3  # the new rows did train away from the init word
    group = [g for g in trainer.optimizer.param_groups if g["name"] == "embedding"][0]
    assert group["params"] == [layer.vectors] and group["lr"] == 5e-3 and group["weight_decay"] == 0

    straight = load_file(out / "lora.safetensors")
    assert torch.equal(straight[f"bundle_emb.{TOKEN}.string_to_param.*"], layer.vectors.detach())
    assert set(load_file(out / "lora-emb.safetensors")) == {"emb_params"}
    assert any(k.startswith("lora_te_") for k in straight) and any(k.startswith("lora_unet_") for k in straight)

    # 2 steps, then 2 more resumed from the checkpoint: the same file, bit for bit, token included.
    half = tmp_path / "half"
    flags = ["--model", model_dir, "--data", shapes, "--output", half, "--train-embedding", TOKEN, "--trigger", TOKEN,
             "--embedding-vectors", 2, "--embedding-init", "red", "--train-text-encoder", "--save-every", 2,
             *train_flags(batch_size=2)]
    assert main(["train", *map(str, flags), "--steps", "2"]) == 0
    assert main(["train", *map(str, flags), "--steps", "4", "--resume", "latest"]) == 0
    for name in ("lora.safetensors", "lora-emb.safetensors"):
        a, b = load_file(out / name), load_file(half / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sd1_file_renders_the_same_in_diffusers(model_dir, sd1_run, capsys):
    from diffusers import StableDiffusionPipeline

    from imglora.generate import GenerateArgs, generate

    out, _ = sd1_run
    prompt = f"a red {TOKEN} on a white background"
    model = load_model(model_dir)
    base = render(model.pipe, prompt)
    attach(model, Adapters(model.pipe), out / "lora.safetensors")
    ours = render(model.pipe, prompt)
    assert np.abs(ours - base).max() > 1e-2
    assert model.pipe.tokenizer.tokenize(model.pipe.maybe_convert_prompt(TOKEN, model.pipe.tokenizer)) == \
        [TOKEN, f"{TOKEN}_1"]  # multi-vector tokens expand as A1111 and diffusers do

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    tensors = load_file(out / "lora.safetensors")
    with pytest.raises(ValueError, match="lora"):  # diffusers refuses the bundle_emb keys A1111 reads...
        pipe.load_lora_weights(str(out / "lora.safetensors"))
    # ...so it gets the LoRA keys, and the token from the standalone file.
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    pipe.load_textual_inversion(str(out / "lora-emb.safetensors"), token=TOKEN)
    theirs = render(pipe, prompt)
    assert np.abs(ours - theirs).max() < 1e-5
    # imglora's own generate gives that image too (as 8-bit PNG pixels)
    image = generate(model, GenerateArgs(prompt, seed=0, steps=2, width=32, height=32))[0]
    assert np.abs(np.asarray(image) / 255.0 - theirs[0]).max() <= 1 / 255 + 1e-6

    assert main(["inspect", str(out / "lora.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embeddings"] == {TOKEN: {"vectors": 2, "width": {"text_encoder": 32}}}
    assert not info["warnings"]


def test_convert_resize_and_merge_keep_the_token(model_dir, sd1_run, tmp_path, capsys):
    out, _ = sd1_run
    src = out / "lora.safetensors"
    key = f"bundle_emb.{TOKEN}.string_to_param.*"
    vectors = load_file(src)[key]
    made = {"convert": ["convert", src, tmp_path / "c.safetensors", "--to", "kohya"],
            "to lora": ["convert", src, tmp_path / "l.safetensors", "--to", "lora", "--rank", 2, "--model", model_dir],
            "resize": ["resize", src, tmp_path / "r.safetensors", "--rank", 2],
            "merge": ["merge", tmp_path / "m.safetensors", f"{src}:0.5", src]}
    for what, argv in made.items():
        assert main([str(a) for a in argv]) == 0, (what, capsys.readouterr().err)
        capsys.readouterr()
        written = load_file(argv[1] if what == "merge" else argv[2])
        assert torch.equal(written[key], vectors.to(written[key].dtype)), what  # at --save-precision
        assert any(k.startswith("lora_unet_") for k in written), what

    # Two different vectors for one token, or a format without a place for it: refused, nothing written.
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({**load_file(src), key: vectors + 1}, other)
    for argv, message in (
            (["merge", tmp_path / "bad.safetensors", src, other], "is bundled in"),
            (["convert", src, tmp_path / "bad.safetensors", "--to", "lora", "--rank", 2], "made for another model"),
            (["convert", src, tmp_path / "bad.safetensors", "--to", "diffusers"], "the diffusers format cannot hold")):
        assert main([str(a) for a in argv]) == 2
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imglora:")]
        assert len(said) == 1 and message in said[0], said  # the one error line, after any progress bar
    assert not (tmp_path / "bad.safetensors").exists()


def test_sdxl_trains_both_encoders_and_renders_the_same_in_diffusers(make_pipe, shapes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model_dir = tmp_path / "sdxl"
    make_pipe("sdxl").save_pretrained(model_dir)
    out = tmp_path / "xl"
    trainer = Trainer(config(model_dir, shapes, out, steps=2, embedding_vectors=3, embedding_init="circle"))
    trainer.run()
    assert {c: p.shape for c, p in trainer.emb_params.items()} == {"text_encoder": (3, 32), "text_encoder_2": (3, 32)}
    tensors = load_file(out / "lora.safetensors")
    assert {k for k in tensors if k.startswith("bundle_emb.")} == {f"bundle_emb.{TOKEN}.clip_l",
                                                                    f"bundle_emb.{TOKEN}.clip_g"}
    alone = load_file(out / "lora-emb.safetensors")
    assert set(alone) == {"clip_l", "clip_g"} and torch.equal(alone["clip_g"], tensors[f"bundle_emb.{TOKEN}.clip_g"])

    prompt = f"a red {TOKEN}"
    model = load_model(model_dir)
    attach(model, Adapters(model.pipe), out / "lora.safetensors")
    ours = render(model.pipe, prompt)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    for key, te, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2,
                                                                          pipe.tokenizer_2)):
        pipe.load_textual_inversion(alone[key], token=TOKEN, text_encoder=te, tokenizer=tok)
    assert np.abs(ours - render(pipe, prompt)).max() < 1e-5
    emb.remove_tokens(model.pipe, [TOKEN])  # two tokenizers here (the in-process pipeline shares one)
    assert [len(t) for t in (model.pipe.tokenizer, model.pipe.tokenizer_2)] == \
        [te.get_input_embeddings().num_embeddings for te in (model.pipe.text_encoder, model.pipe.text_encoder_2)] == \
        [len(pipe.tokenizer) - 3] * 2


def test_embedding_only_and_unloading_restore_the_base_exactly(model_dir, shapes, make_pipe, tmp_path):
    out = tmp_path / "ti"
    assert main(["train", "--model", str(model_dir), "--data", str(shapes), "--output", str(out), "--steps", "3",
                 "--train-embedding", TOKEN, "--trigger", TOKEN, "--embedding-only", "--ema", "--ema-decay", "0.5",
                 *train_flags(batch_size=2)]) == 0
    key = f"bundle_emb.{TOKEN}.string_to_param.*"
    shipped, raw = load_file(out / "lora.safetensors"), load_file(out / "lora-raw.safetensors")
    assert set(shipped) == {key}  # no LoRA at all
    # --ema averages the token too: the shipped file and the -emb file hold the average, -raw the trained vectors
    assert torch.equal(load_file(out / "lora-emb.safetensors")["emb_params"], shipped[key])
    assert (shipped[key] - raw[key]).abs().amax() > 1e-6
    model = load_model(model_dir)
    base = render(model.pipe, f"a red {TOKEN}")
    attach(model, Adapters(model.pipe), out / "lora.safetensors")  # an adapter of no modules, one token
    assert model.pipe.tokenizer.tokenize(TOKEN) == [TOKEN]
    assert np.abs(render(model.pipe, f"a red {TOKEN}") - base).max() > 1e-3

    for kind in ("sd1", "sdxl"):  # the in-process SDXL pipeline shares one tokenizer between its encoders
        pipe = make_pipe(kind)
        before = [te.get_input_embeddings().weight.clone() for _, _, te in emb.encoders(pipe)]
        ids = pipe.tokenizer(f"a red {TOKEN}").input_ids
        parts = {c: torch.randn(2, te.config.hidden_size) for c, _, te in emb.encoders(pipe)}
        emb.add_tokens(pipe, {TOKEN: parts})
        for (c, tok, te), rows in zip(emb.encoders(pipe), before):
            weight = te.get_input_embeddings().weight
            assert torch.equal(weight[:len(rows)], rows) and torch.equal(weight[len(rows):], parts[c])
            assert tok.convert_tokens_to_ids(f"{TOKEN}_1") == len(rows) + 1
        emb.remove_tokens(pipe, [TOKEN])
        assert pipe.tokenizer(f"a red {TOKEN}").input_ids == ids
        for (_, _, te), rows in zip(emb.encoders(pipe), before):
            assert torch.equal(te.get_input_embeddings().weight, rows)


def test_reg_uncond_adds_regularisation_images_with_the_empty_caption(model_dir, shapes, tmp_path):
    reg = tmp_path / "reg"
    synth_shapes(reg, 4, seed=5, size=32)
    trainer = Trainer(config(model_dir, shapes, tmp_path / "u", steps=1, reg_data=str(reg), reg_uncond=0.5))
    captions = [e.caption for e in trainer.data.examples]
    assert len(captions) == 6 + 4 + 2 and captions.count("") == 2
    assert all(e.path.is_relative_to(reg) for e in trainer.data.examples if not e.caption)
    trainer.lock.release()


def test_clear_errors(model_dir, shapes, tmp_path, capsys):
    def train(*extra):
        return main(["train", "--model", str(model_dir), "--data", str(shapes), "--output", str(tmp_path / "x"),
                     "--steps", "1", *train_flags(batch_size=2), *extra])

    cases = [
        (("--train-embedding", "red", "--trigger", "red"), "the token 'red' is already in the text_encoder's"),
        (("--train-embedding", TOKEN, "--trigger", TOKEN, "--embedding-init", "zorbly"), "'zorbly' is 6 tokens"),
        (("--train-embedding", "Zorbly"), "must be one lower-case word"),
        (("--train-embedding", TOKEN), "no caption contains the token 'zorbly'"),
        (("--embedding-vectors", "2"), "--embedding-vectors needs --train-embedding"),
        (("--reg-uncond", "0.5"), "--reg-uncond needs --reg-data"),
    ]
    for flags, message in cases:
        assert train(*flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()  # every one was refused before the output folder was made

    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({f"bundle_emb.{TOKEN}.clip_l_out": torch.zeros(1, 32)}, bad)
    assert main(["inspect", str(bad)]) == 2
    assert "unrecognised embedding key bundle_emb.zorbly.clip_l_out" in capsys.readouterr().err
    alone = tmp_path / "alone.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, alone)
    assert main(["inspect", str(alone)]) == 2
    assert "a textual-inversion embedding (emb_params), not an adapter" in capsys.readouterr().err
