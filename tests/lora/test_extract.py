"""Plain LoRA from other kinds (convert --to lora) and from two checkpoints (extract): at full rank exact, at
lower rank the reported energy is the true share kept, and diffusers' load_lora_weights reads the result."""

import numpy as np
import pytest
import torch
from test_lycoris import lycoris_file, outputs

from imglora.formats.lora_file import load_adapter, save_adapter
from imglora.lora.adapters import Adapters
from imglora.ops.extract import extract, lora_from_delta, to_lora, weights_of

ARGS = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=3.0, width=32, height=32, output_type="np")


def test_svd_keeps_the_best_rank_and_says_how_much():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 20, generator=g, dtype=torch.float64).float()
    m, kept, total = lora_from_delta(delta, 3)
    S = torch.linalg.svdvals(delta.double())
    assert m.rank == 3 and abs(kept / total - float((S[:3] ** 2).sum() / (S ** 2).sum())) < 1e-9
    assert abs(float((delta - m.delta()).norm() ** 2) - float((S[3:] ** 2).sum())) < 1e-3  # Eckart-Young
    conv = torch.randn(8, 6, 3, 3, generator=g)
    m, kept, total = lora_from_delta(conv, 54)
    assert m.A.shape == (8, 6, 3, 3) and kept / total > 1 - 1e-9  # rank capped at min(out, in·k·k)
    torch.testing.assert_close(m.delta(), conv, rtol=1e-4, atol=1e-5)


def test_a_lycoris_file_becomes_a_lora_diffusers_reads(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    ref, path = lycoris_file(pipe, "loha", {"dora_wd": True, "preset": "attn-mlp"}, tmp_path / "loha.safetensors")
    adapter, _ = load_adapter(path)
    full, energy, notes = to_lora(adapter, 64, weights_of(pipe, adapter.modules))  # rank >= every layer's
    assert energy.kept > 1 - 1e-6 and not notes
    ours = make_pipe("sd1")
    Adapters(ours).load("x", full)
    for a, b in zip(outputs(ours), outputs(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    small, energy, _ = to_lora(adapter, 2, weights_of(pipe, adapter.modules))
    assert 0 < energy.kept < 1 and energy.worst <= energy.kept
    assert {m.rank for m in small.modules.values()} == {2}
    # diffusers+peft (the independent reader) loads it and gives what imglora gives.
    file = tmp_path / "as_lora.safetensors"
    save_adapter(file, small, fmt="diffusers")
    mine, theirs = make_pipe("sd1"), make_pipe("sd1")
    Adapters(mine).load("x", small)
    theirs.load_lora_weights(str(file), adapter_name="x")
    run = lambda p: p(**ARGS, generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    assert np.allclose(run(mine), run(theirs), atol=2e-4)


@pytest.mark.parametrize("algo", ["diag-oft", "boft", "ia3", "glora"])
def test_kinds_that_transform_the_base_weight_become_a_lora(make_pipe, tmp_path, algo):
    """OFT, BOFT, (IA)³ and GLoRA build ΔW from the model's weights: at full rank the LoRA gives LyCORIS's output."""
    pipe = make_pipe("sd1")
    ref, path = lycoris_file(pipe, algo, {"preset": "attn-mlp"}, tmp_path / f"{algo}.safetensors")
    adapter, _ = load_adapter(path)
    full, energy, notes = to_lora(adapter, 64, weights_of(pipe, adapter.modules))
    assert energy.kept > 1 - 1e-6 and not notes and {m.kind for m in full.modules.values()} == {"lora"}
    ours = make_pipe("sd1")
    Adapters(ours).load("x", full)
    for a, b in zip(outputs(ours), outputs(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_extract_recovers_a_low_rank_difference_exactly(make_pipe):
    base, tuned = make_pipe("sd1"), make_pipe("sd1")
    keys = Adapters(base).targets("conv", text_encoder=True, te_mlp=True)
    g = torch.Generator().manual_seed(3)
    changed = keys[::3]
    with torch.no_grad():
        for key, w in weights_of(tuned, changed).items():
            B = torch.randn(w.shape[0], 2, generator=g)
            A = torch.randn(2, w[0].numel(), generator=g)
            w += (0.05 * B @ A).reshape(w.shape)  # a rank-2 fine-tune of these layers
    lora, energy = extract(weights_of(base, keys), weights_of(tuned, keys), rank=2, progress=False)
    assert set(lora.modules) == set(changed) and energy.kept > 1 - 1e-9
    for key, w in weights_of(tuned, changed).items():
        torch.testing.assert_close(weights_of(base, [key])[key] + lora.modules[key].delta().reshape(w.shape), w,
                                   rtol=1e-4, atol=1e-5)
