"""convert, merge and resize against their definitions."""

import json

import helpers
import pytest
import torch
from safetensors.torch import load_file

from imglora.cli import main
from imglora.formats.diffusers import installed_path
from imglora.formats.files import read_safetensors
from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.lora.modules import LoraModule
from imglora.lora.state import Adapter
from imglora.ops.extract import weights_of
from imglora.ops.merge import concatenate, merge
from imglora.ops.resize import resize, truncate


def random_adapter(make_pipe, kind="sd1", preset="conv", rank=4, alpha=2.0, seed=0) -> Adapter:
    return helpers.random_adapter(make_pipe(kind), preset, True, arch=kind, rank=rank, alpha=alpha, seed=seed,
                                  conv_rank=2, conv_alpha=3.0)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_kohya_diffusers_kohya_round_trip_preserves_every_delta(make_pipe, tmp_path, kind):
    adapter = random_adapter(make_pipe, kind)
    first = tmp_path / "first.safetensors"
    save_adapter(first, adapter, metadata={"ss_base_model_version": "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1"})
    fp32 = ["--save-precision", "fp32"]
    assert main(["convert", str(first), str(tmp_path / "d.safetensors"), "--to", "diffusers", *fp32]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "back.safetensors"), "--to", "kohya",
                 *fp32]) == 0
    a, b = load_file(first), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("lora_down.weight"))
    # The diffusers file carries the scale in lora_B (alpha == rank), so only the product survives exactly.
    before, after = load_adapter(first)[0], load_adapter(tmp_path / "back.safetensors")[0]
    for key, m in before.modules.items():
        assert after.modules[key].alpha == m.rank
        torch.testing.assert_close(after.modules[key].delta(), m.delta(), rtol=1e-5, atol=1e-6)
    if kind == "sdxl":
        assert any("input_blocks" in k for k in a) and any(k.startswith("lora_te2_") for k in a)


def test_diffusers_file_needs_no_alpha_metadata(make_pipe, tmp_path):
    """ComfyUI ignores lora_adapter_metadata (FORMATS.md §0.6): lora_B @ lora_A alone must be the full ΔW."""
    adapter = random_adapter(make_pipe, "sd1")  # alpha 2 on rank 4, conv alpha 3 on rank 2
    save_adapter(tmp_path / "d.safetensors", adapter, fmt="diffusers")
    tensors = load_file(tmp_path / "d.safetensors")
    config = json.loads(read_safetensors(tmp_path / "d.safetensors")[1]["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == config["unet.r"] and config["unet.alpha_pattern"] == config["unet.rank_pattern"]
    for key, m in adapter.modules.items():
        component, path = key.split(".", 1)
        name = f"{component}.{installed_path(key)}"
        A, B = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        torch.testing.assert_close(LoraModule(A, B, float(A.shape[0])).delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_exported_kohya_file_follows_the_spec(make_pipe, tmp_path):
    adapter = random_adapter(make_pipe, "sd1")
    path = save_adapter(tmp_path / "x.safetensors", adapter)
    tensors = load_file(path)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for n in names:  # FORMATS.md §0.2: down, up and a nonzero 0-dim alpha for every module
        assert tensors[f"{n}.lora_down.weight"].dim() in (2, 4)
        assert tensors[f"{n}.alpha"].dim() == 0 and tensors[f"{n}.alpha"].item() != 0
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    proj_in = next(k for k in tensors if k.endswith("proj_in.lora_down.weight"))
    assert tensors[proj_in].dim() == 4  # SD1's proj_in is a 1x1 conv: 4-D for PEFT (FORMATS.md §3)


def _delta(adapter: Adapter, key: str) -> torch.Tensor:
    return adapter.modules[key].delta()


def test_merge_by_concatenation_is_exact(make_pipe):
    a = random_adapter(make_pipe, seed=1)
    b = random_adapter(make_pipe, preset="attn", rank=3, alpha=6.0, seed=2)
    merged = concatenate([(a, 0.7), (b, -0.3)])
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    for key in merged.modules:
        expected = sum(w * _delta(x, key) for x, w in ((a, 0.7), (b, -0.3)) if key in x.modules)
        assert torch.allclose(_delta(merged, key), expected, atol=1e-5)


def test_svd_merge_and_resize_match_the_best_low_rank_approximation(make_pipe):
    a = random_adapter(make_pipe, seed=1)
    b = random_adapter(make_pipe, seed=2)
    low, energy = merge([(a, 0.5), (b, 0.5)], rank=3)
    kept = total = 0.0
    for key, m in low.modules.items():
        full = 0.5 * _delta(a, key) + 0.5 * _delta(b, key)
        S = torch.linalg.svdvals(full.flatten(1).double())
        k = min(3, S.numel())
        best_error = (S[k:] ** 2).sum().sqrt()
        error = torch.linalg.norm((_delta(low, key) - full).flatten(1).double())
        assert torch.allclose(error, best_error, rtol=1e-3, atol=1e-4), key  # Eckart-Young optimum
        assert m.rank <= 3
        kept, total = kept + float((S[:k] ** 2).sum()), total + float((S ** 2).sum())
    assert energy.kept == pytest.approx(kept / total, rel=1e-4)
    same, energy = resize(a, 100)  # more rank than there is: lossless
    assert energy.kept == pytest.approx(1.0)
    assert all(torch.allclose(_delta(same, k), _delta(a, k), atol=1e-4) for k in a.modules)


def test_truncate_without_forming_the_product():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(50, 8, generator=g), torch.randn(8, 70, generator=g)
    nb, na, kept, total = truncate(B, A, 8)
    assert torch.allclose(nb @ na, B @ A, atol=1e-4) and kept == pytest.approx(total)


def test_merge_refuses_mixed_base_models(make_pipe, tmp_path):
    a = random_adapter(make_pipe, "sd1")
    b = random_adapter(make_pipe, "sdxl")
    save_adapter(tmp_path / "a.safetensors", a, metadata={"ss_base_model_version": "sd_v1"})
    save_adapter(tmp_path / "b.safetensors", b, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert main(["merge", str(tmp_path / "m.safetensors"), f"{tmp_path}/a.safetensors:0.5",
                 f"{tmp_path}/b.safetensors:0.5"]) == 2
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_cli_records_sources(make_pipe, tmp_path, capsys):
    for i in range(2):
        save_adapter(tmp_path / f"s{i}.safetensors", random_adapter(make_pipe, seed=i))
    assert main(["merge", str(tmp_path / "m.safetensors"), f"{tmp_path}/s0.safetensors:0.7",
                 f"{tmp_path}/s1.safetensors:0.3", "--rank", "2"]) == 0
    assert "retained energy" in capsys.readouterr().out
    merged, _ = load_adapter(tmp_path / "m.safetensors")
    assert "s0.safetensors" in merged.metadata["modelspec.merged_from"]
    assert '"weight": 0.7' in merged.metadata["imglora.merged_from"]
    assert set(merged.ranks()) == {2}


def test_inspect_reports_what_the_file_is(make_pipe, tmp_path, capsys):
    save_adapter(tmp_path / "x.safetensors", random_adapter(make_pipe, "sdxl", preset="cross-attn"),
                 metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_tag_frequency": "{not json"})
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    for text in ("format:      kohya", "base model:  SDXL", "rank:        4", "attn2.to_q ×", "text_encoder_2:",
                 "warning: metadata ss_tag_frequency is not valid JSON", "sshs_model_hash"):
        assert text in out, text


def test_conv_module_delta_matches_the_two_convolutions():
    g = torch.Generator().manual_seed(0)
    m = LoraModule(torch.randn(3, 5, 3, 3, generator=g), torch.randn(7, 3, 1, 1, generator=g), 6.0)
    x = torch.randn(1, 5, 8, 8, generator=g)
    two_step = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, m.A, padding=1), m.B) * m.scale
    assert torch.allclose(torch.nn.functional.conv2d(x, m.delta(), padding=1), two_step, atol=1e-4)


# -- honest files: ranks the tensors have, the precision asked for, the format's name ---------------------
def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imglora: ") and all(w in err[0] for w in words), err
    assert "Traceback" not in err[0]


def _dtypes(path) -> set[str]:
    from imglora.formats.files import read_header

    return {info["dtype"] for info in read_header(path)[0].values()}


def test_resize_above_the_files_rank_is_refused_and_writes_nothing(make_pipe, tmp_path, capsys):
    src = save_adapter(tmp_path / "src.safetensors", random_adapter(make_pipe))  # rank 4 (conv 2)
    for rank in ("5", "64"):
        assert main(["resize", str(src), str(tmp_path / "big.safetensors"), "--rank", rank]) == 2
        _one_line(capsys, "src.safetensors", f"--rank {rank} is above the file's rank 4", "choose 1 to 4")
    for rank in ("0", "-3", "two"):
        assert main(["resize", str(src), str(tmp_path / "big.safetensors"), "--rank", rank]) == 2
        _one_line(capsys, "--rank")
    assert not (tmp_path / "big.safetensors").exists()
    assert main(["resize", str(src), str(tmp_path / "same.safetensors"), "--rank", "4"]) == 0  # the file's own rank


def test_resize_metadata_states_the_ranks_the_tensors_have(make_pipe, tmp_path, capsys):
    from imglora.formats.metadata import build_metadata

    adapter = random_adapter(make_pipe)  # linear rank 4 alpha 2, 3x3 conv rank 2 alpha 3
    meta = build_metadata(adapter, "sd1", "src")
    args = json.loads(meta["ss_network_args"])
    assert args == {"conv_dim": "2", "conv_alpha": "3.0"} and meta["ss_network_dim"] == "4"
    meta["ss_network_args"] = json.dumps({**args, "dropout": "0.1"})  # another tool's argument is kept
    src = save_adapter(tmp_path / "src.safetensors", adapter, metadata=meta)
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(src), str(out), "--rank", "3"]) == 0
    assert "rank 2/3" in capsys.readouterr().out  # the 3x3 convolutions keep their rank 2
    small, _ = load_adapter(out)
    conv = {m.rank for m in small.modules.values() if m.A.dim() == 4 and m.A.shape[-1] > 1}
    linear = {m.rank for m in small.modules.values() if not (m.A.dim() == 4 and m.A.shape[-1] > 1)}
    assert conv == {2} and linear == {3}
    assert small.metadata["ss_network_dim"] == "3" and small.metadata["ss_network_alpha"] == "3.0"
    assert json.loads(small.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0", "dropout": "0.1"}
    assert all(m.alpha == m.rank for m in small.modules.values())  # the scale is in the tensors


def test_merge_rank_is_checked(make_pipe, tmp_path, capsys):
    for i in range(2):
        save_adapter(tmp_path / f"s{i}.safetensors", random_adapter(make_pipe, seed=i))
    inputs = [f"{tmp_path}/s0.safetensors:0.5", f"{tmp_path}/s1.safetensors:0.5"]
    assert main(["merge", str(tmp_path / "m.safetensors"), *inputs, "--rank", "9"]) == 2  # 4 + 4 = 8
    _one_line(capsys, "--rank 9 is above the merged rank 8", "leave --rank out")
    assert main(["merge", str(tmp_path / "m.safetensors"), *inputs, "--rank", "0"]) == 2
    _one_line(capsys, "--rank: 0 is below 1")
    for weight in ("nan", "inf", "-inf", "1e30", "101"):
        assert main(["merge", str(tmp_path / "m.safetensors"), inputs[0], f"{tmp_path}/s1.safetensors:{weight}"]) == 2
        _one_line(capsys, "the weight must be a number from -100 to 100")
    assert not (tmp_path / "m.safetensors").exists()
    assert main(["merge", str(tmp_path / "m.safetensors"), *inputs, "--rank", "8"]) == 0


@pytest.mark.parametrize("command", ["convert", "merge", "resize"])
def test_save_precision_defaults_to_trainings_fp16(make_pipe, tmp_path, command):
    src = save_adapter(tmp_path / "src.safetensors", random_adapter(make_pipe))
    assert _dtypes(src) == {"F32"}

    def run(out, *flags):
        argv = {"convert": ["convert", str(src), str(out), "--to", "kohya"],
                "merge": ["merge", str(out), f"{src}:0.5"],
                "resize": ["resize", str(src), str(out), "--rank", "2"]}[command]
        assert main([*argv, *flags]) == 0
        return _dtypes(out)

    assert run(tmp_path / "default.safetensors") == {"F16"}
    for precision, dtype in (("fp32", "F32"), ("bf16", "BF16"), ("fp16", "F16")):
        assert run(tmp_path / f"{precision}.safetensors", "--save-precision", precision) == {dtype}
    # The values are the source's, rounded to the precision asked for.
    a, b = load_adapter(src)[0], load_adapter(tmp_path / "fp32.safetensors")[0]
    for key in a.modules if command == "convert" else []:
        assert torch.equal(a.modules[key].A, b.modules[key].A)


def test_inspect_calls_a_diffusers_file_diffusers(make_pipe, tmp_path, capsys):
    src = save_adapter(tmp_path / "k.safetensors", random_adapter(make_pipe, preset="cross-attn"))
    # `--to peft`, the old name, still works and writes the same diffusers file.
    for i, to in enumerate(("diffusers", "peft")):
        out_file = tmp_path / f"d{i}.safetensors"
        assert main(["convert", str(src), str(out_file), "--to", to]) == 0
        assert "(kohya) -> " in capsys.readouterr().out
        assert main(["inspect", str(out_file)]) == 0
        out = capsys.readouterr().out
        assert "format:      diffusers\n" in out and "peft" not in out.split("metadata:")[0]
        assert main(["inspect", "--json", str(out_file)]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == "diffusers"
    assert load_file(tmp_path / "d0.safetensors").keys() == load_file(tmp_path / "d1.safetensors").keys()
    assert load_adapter(tmp_path / "d1.safetensors")[1] == "peft"  # the loader's own name is unchanged
    assert main(["convert", str(tmp_path / "d1.safetensors"), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'd1.safetensors'} (diffusers) -> ")


def test_outputs_are_refused_before_the_inputs_are_read(make_pipe, tmp_path, capsys):
    src = save_adapter(tmp_path / "src.safetensors", random_adapter(make_pipe))
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    for argv in (["convert", str(src), str(taken), "--to", "kohya"], ["merge", str(taken), str(src)],
                 ["resize", str(src), str(taken), "--rank", "2"], ["resize", "missing.safetensors", str(taken),
                                                                   "--rank", "2"]):
        assert main(argv) == 2
        _one_line(capsys, "taken.safetensors: already exists", "--overwrite")
        assert taken.read_bytes() == b"mine"


def test_values_too_large_for_fp16_are_refused_with_the_way_out(make_pipe, tmp_path, capsys):
    big = helpers.random_adapter(make_pipe("sd1"), "cross-attn", arch="sd1", scale=1e5)
    src = save_adapter(tmp_path / "big.safetensors", big)
    assert main(["convert", str(src), str(tmp_path / "half.safetensors"), "--to", "kohya"]) == 2
    _one_line(capsys, "half.safetensors: values up to", "do not fit in fp16", "--save-precision fp32 or bf16")
    assert not (tmp_path / "half.safetensors").exists()
    assert main(["convert", str(src), str(tmp_path / "bf16.safetensors"), "--to", "kohya", "--save-precision",
                 "bf16"]) == 0


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_other_kinds_convert_to_lora_and_merge_through_their_delta(make_pipe, tmp_path, capsys, kind):
    pipe = make_pipe("sd1")
    pipe.save_pretrained(tmp_path / "model")
    model = ["--model", str(tmp_path / "model")]
    other = helpers.random_adapter(pipe, "attn", arch="sd1", kind=kind, scale=0.1, seed=1)
    lora = helpers.random_adapter(pipe, "attn", arch="sd1", seed=2)
    src, plain = save_adapter(tmp_path / f"{kind}.safetensors", other), save_adapter(tmp_path / "l.safetensors", lora)
    capsys.readouterr()
    assert main(["resize", str(src), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    _one_line(capsys, f"{kind}.safetensors: resize works on LoRA/LoCon modules", "convert IN OUT --to lora")
    # convert --to lora: at a rank no layer exceeds, the same ΔW, as a plain LoRA every client reads.
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--to", "lora", "--rank", "64", *model,
                 "--save-precision", "fp32"]) == 0
    assert "retained energy 100.00% overall" in capsys.readouterr().out
    converted = load_adapter(tmp_path / "c.safetensors")[0]
    assert set(converted.kinds()) == {"lora"} and converted.metadata["ss_network_module"] == "networks.lora"
    w0 = {k: v for k, v in weights_of(pipe, other.modules).items()}
    for key, m in other.modules.items():
        torch.testing.assert_close(converted.modules[key].delta(), m.delta(w0[key]).reshape(w0[key].shape),
                                   rtol=1e-4, atol=1e-6)
    # merge: the blend Σ wᵢ·ΔWᵢ, exact (as full deltas) without --rank.
    assert main(["merge", str(tmp_path / "m.safetensors"), f"{src}:0.5", f"{plain}:-0.3", *model,
                 "--save-precision", "fp32"]) == 0
    merged = load_adapter(tmp_path / "m.safetensors")[0]
    for key, m in merged.modules.items():
        want = 0.5 * other.modules[key].delta(w0[key]).reshape(w0[key].shape) - 0.3 * lora.modules[key].delta()
        torch.testing.assert_close(m.delta(w0[key]).reshape(w0[key].shape), want, rtol=1e-4, atol=1e-6)
    assert main(["merge", str(tmp_path / "m2.safetensors"), f"{src}:0.5", f"{plain}:-0.3", *model, "--rank", "2"]) == 0
    assert {m.rank for m in load_adapter(tmp_path / "m2.safetensors")[0].modules.values()} == {2}
    assert not (tmp_path / "r.safetensors").exists()


def test_extract_makes_a_lora_of_what_a_fine_tune_changed(make_pipe, tmp_path, capsys):
    base, tuned = make_pipe("sd1"), make_pipe("sd1")
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    with torch.no_grad():
        w = weights_of(tuned, [key])[key]
        w += 0.1 * torch.randn(w.shape[0], 1) @ torch.randn(1, w.shape[1])  # a rank-1 change of one layer
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(out), "--rank", "4",
                 "--save-precision", "fp32"]) == 0
    said = capsys.readouterr().out
    assert "1 of" in said and "layers changed" in said and "retained energy 100.00%" in said
    lora = load_adapter(out)[0]
    assert list(lora.modules) == [key]
    torch.testing.assert_close(weights_of(base, [key])[key] + lora.modules[key].delta(), w, rtol=1e-4, atol=1e-5)
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "y.safetensors"),
                 "--rank", "4"]) == 2
    assert "the same weights in every compared layer" in capsys.readouterr().err
