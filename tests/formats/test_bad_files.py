"""Bad adapter files: each is one clear line and exit code 2, never a traceback (RELIABILITY.md F1-F5)."""

import json
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save, save_file

from imglora.cli import main
from imglora.errors import ImgloraError
from imglora.formats.files import read_safetensors, write_safetensors
from imglora.formats.lora_file import load_adapter

NAME = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"


def good_tensors(alpha=4.0, rank=4, width=32):
    return {f"{NAME}.lora_down.weight": torch.randn(rank, width), f"{NAME}.lora_up.weight": torch.randn(16, rank),
            f"{NAME}.alpha": torch.tensor(alpha)}


def raw_file(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _bad_files(tmp_path):
    good = save(good_tensors())
    files = {
        "empty": (b"", "empty file"),
        "tiny": (b"\x01" * 20, "incomplete safetensors"),
        "truncated": (good[:-10], "incomplete safetensors"),
        "trailing": (good + b"xx", "incomplete safetensors"),
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n", "Git LFS pointer"),
        "zip": (b"PK\x03\x04" + b"\0" * 100, "PyTorch pickle"),
        "pickle": (b"\x80\x04\x95" + b"\0" * 100, "PyTorch pickle"),
        "not_json": (struct.pack("<Q", 4) + b"{{{{", "malformed safetensors header"),
        "huge_n": (struct.pack("<Q", 2 ** 40) + b"{}", "incomplete safetensors"),
        "overlap": (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
                    "invalid offsets"),
        "bad_shape": (raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "malformed entry for tensor 'a'"),
        "bad_dtype": (raw_file({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "unknown dtype"),
        "metadata_not_str": (raw_file({"__metadata__": {"x": 1}}), "metadata"),
        "duplicate": (struct.pack("<Q", 0), None),  # built below
    }
    dup = ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
           '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}').encode()
    files["duplicate"] = (struct.pack("<Q", len(dup)) + dup + b"\0" * 8, "duplicate key")
    out = {}
    for name, (data, reason) in files.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        out[name] = (p, reason)
    for name, tensors, reason in [
        ("alpha0", good_tensors(alpha=0.0), "alpha 0"),
        ("no_lora_keys", {"model.weight": torch.randn(2, 2)}, "no LoRA keys"),
        ("nan", {**good_tensors(), f"{NAME}.lora_up.weight": torch.full((16, 4), float("nan"))}, "NaN"),
        ("no_up", {f"{NAME}.lora_down.weight": torch.randn(4, 32)}, "lacks its lora_up"),
        ("rank_mismatch", {**good_tensors(), f"{NAME}.lora_up.weight": torch.randn(16, 3)}, "do not multiply"),
        ("loha_partial", {f"{NAME}.hada_w1_a": torch.randn(2, 2)}, "lacks its hada_w1_b weight"),
        ("mixed_kinds", {**good_tensors(), f"{NAME}.hada_w1_a": torch.randn(2, 2)}, "tensors of several kinds"),
        ("stray_key", {**good_tensors(), f"{NAME}.lora_side.weight": torch.randn(2, 2)}, "unrecognised key"),
        ("oft_shapes", {f"{NAME}.oft_blocks": torch.randn(4, 2, 3)}, "its oft tensors do not fit together"),
        ("unknown_kind", {f"{NAME}.vera_lambda_b": torch.randn(16)}, "unrecognised key"),
        ("loha_shapes", {f"{NAME}.hada_w1_a": torch.randn(16, 2), f"{NAME}.hada_w1_b": torch.randn(2, 32),
                         f"{NAME}.hada_w2_a": torch.randn(16, 2), f"{NAME}.hada_w2_b": torch.randn(3, 32)},
         "its loha tensors do not fit together"),
        ("alpha_vector", {**good_tensors(), f"{NAME}.alpha": torch.ones(3)}, "has 3 values instead of one"),
        ("rank0", good_tensors(rank=0), "rank 0"),
        ("int_weights", {**good_tensors(), f"{NAME}.lora_down.weight": torch.ones(4, 32, dtype=torch.int32)},
         "holds int32 values"),
        ("bool_alpha", {**good_tensors(), f"{NAME}.alpha": torch.tensor(True)}, "holds bool values"),
    ]:
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, p)
        out[name] = (p, reason)
    return out


def _bad_peft_files(tmp_path):
    """diffusers-PEFT files whose lora_adapter_metadata header is malformed."""
    tensors = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.randn(4, 32),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.lora_B.weight": torch.randn(16, 4)}
    out = {}
    for name, meta in [("peft_list", "[1, 2]"), ("peft_alpha_text", '{"unet.lora_alpha": "eight"}'),
                       ("peft_pattern", '{"unet.alpha_pattern": [4]}'), ("peft_json", "{oops")]:
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, p, metadata={"lora_adapter_metadata": meta})
        out[name] = (p, "malformed lora_adapter_metadata header")
    return out


def test_every_bad_file_is_one_clear_error(tmp_path):
    for name, (path, reason) in {**_bad_files(tmp_path), **_bad_peft_files(tmp_path)}.items():
        with pytest.raises(ImgloraError) as e:
            load_adapter(path)
        line = e.value.line()
        assert str(path) in line and reason in line and "\n" not in line, (name, line)


def test_a_fifo_or_folder_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would wait forever
    for path in (fifo, tmp_path):
        with pytest.raises(ImgloraError, match="not a regular file"):
            load_adapter(path)


def test_huge_header_length_is_rejected_without_reading(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    t = time.perf_counter()
    with pytest.raises(ImgloraError):
        read_safetensors(p)
    assert time.perf_counter() - t < 0.1


def test_wrong_shapes_and_wrong_base_are_refused(tmp_path, make_pipe):
    from imglora.lora.adapters import Adapters
    from imglora.pipeline import attach, model_of

    model = model_of(make_pipe("sd1"))
    adapters = Adapters(model.pipe)
    wrong_width = tmp_path / "wrong_width.safetensors"
    save_file(good_tensors(width=99), wrong_width)
    with pytest.raises(ImgloraError, match="does not fit this model.*do not fit"):
        attach(model, adapters, wrong_width)
    unknown = tmp_path / "unknown_module.safetensors"
    save_file({k.replace("attn2_to_q", "attn9_to_q"): v for k, v in good_tensors().items()}, unknown)
    with pytest.raises(ImgloraError, match="does not exist"):
        attach(model, adapters, unknown)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(good_tensors(), sdxl, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ImgloraError, match="an adapter made for SDXL, the model is SD 1.x"):
        attach(model, adapters, sdxl)
    assert adapters.names == [] and not adapters.layers


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = _bad_files(tmp_path)
    for name in ("truncated", "lfs", "alpha0", "no_lora_keys"):
        path, reason = bad[name]
        r = subprocess.run([sys.executable, "-m", "imglora.cli", "inspect", str(path)], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and str(path) in r.stderr, r.stderr
        assert r.stderr.startswith("imglora: ") and reason in r.stderr


def test_cli_never_overwrites_and_writes_nothing_on_error(tmp_path):
    src = tmp_path / "a.safetensors"
    save_file(good_tensors(), src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 2
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(src), str(out), "--to", "diffusers", "--overwrite"]) == 0
    assert load_adapter(out)[1] == "peft"
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_writer_refuses_non_finite_values_and_keeps_normal_permissions(tmp_path):
    with pytest.raises(ImgloraError, match="NaN or Inf"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.tensor([float("inf")])})
    assert not list(tmp_path.iterdir())
    p = write_safetensors(tmp_path / "y.safetensors", {"a": torch.ones(2)})
    assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_no_unsafe_torch_load_anywhere():
    """RELIABILITY.md F9: every torch.load passes weights_only=True."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.glob("imglora/**/*.py"), *root.glob("ui/**/*.py"), *root.glob("datasets_tools/**/*.py")]:
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path}: {m.group(0)}")
    assert not offenders
