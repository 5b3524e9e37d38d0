"""--masked-loss: a black region gives no gradient, a white mask is exactly no mask, the mask moves with the
image through buckets, crops and flips, alpha masks equal mask files, and the latent cache knows the mask."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imglora.config import TrainConfig
from imglora.data.images import load_image
from imglora.errors import ImgloraError
from imglora.train.data import Example, LatentCache, build_data, pixels
from imglora.train.loop import Trainer
from imglora.train.masks import loss_weights

SIZE = 32  # the tiny VAE halves: 16x16 latents


def picture(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def left_black(size=(SIZE, SIZE), value=255) -> Image.Image:
    """A mask whose left half is black and right half `value`."""
    arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    arr[:, : size[0] // 2] = 0
    return Image.fromarray(arr, "L")


def dataset(root: Path, images: dict, masks: dict | None = None) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for name, img in images.items():
        img.save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {name} thing")
    if masks is not None:
        (root / "masks").mkdir()
        for name, m in masks.items():
            m.save(root / "masks" / f"{name}.png")
    return data


def trainer(model_dir, data: Path, out: Path, **cfg) -> Trainer:
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), steps=1, resolution=SIZE, bucket_step=16,
                      rank=4, batch_size=2, workers=1, targets="conv", **cfg)
    cfg.check()
    t = Trainer(cfg)
    t.lock.release()  # never run: no output folder is held
    return t


def loss_and_grads(t: Trainer, names: list[str], seed: int = 5):
    """The loss of one batch of these images (by file stem) and the adapter's gradients after backward."""
    by_name = {e.path.stem: e for e in t.data.examples}
    generator = torch.Generator().manual_seed(seed)
    batch = t.batches.make([by_name[n] for n in names], 0, generator)
    for p in t.unet_params:
        p.grad = None
    loss = t.loss(batch, generator)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in t.unet_params], batch


def test_a_white_mask_is_exactly_no_mask(model_dir, tmp_path):
    images = {"a": picture(1), "b": picture(2)}
    white = {n: Image.new("L", (SIZE, SIZE), 255) for n in images}
    data = dataset(tmp_path, images, white)
    plain = trainer(model_dir, data, tmp_path / "plain")
    masked = trainer(model_dir, data, tmp_path / "masked", masked_loss=True, mask_dir=str(tmp_path / "masks"))
    loss0, grads0, _ = loss_and_grads(plain, ["a", "b"])
    loss1, grads1, batch = loss_and_grads(masked, ["a", "b"])
    assert batch["mask"].shape == (2, 1, 16, 16) and bool((batch["mask"] == 1).all())
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads0, grads1))
    assert any(g.abs().sum() > 0 for g in grads0)


def test_a_black_region_contributes_no_gradient(model_dir, tmp_path):
    # Within an image, the UNet's output gets exactly zero gradient where the mask is black. (The adapter's
    # gradient still depends on the black region's pixels: the UNet sees the whole noisy latent, so they
    # change its prediction in the white region too; only their own error is left out.)
    data = dataset(tmp_path, {"a": picture(1), "b": picture(2)}, {"a": left_black(), "b": left_black(value=128)})
    t = trainer(model_dir, data, tmp_path / "out", masked_loss=True, mask_dir=str(tmp_path / "masks"))
    outputs = []

    def keep(module, args, out):
        out.sample.retain_grad()
        outputs.append(out.sample)

    hook = t.pipe.unet.register_forward_hook(keep)
    _, _, batch = loss_and_grads(t, ["a", "b"])
    hook.remove()
    grad = outputs[0].grad
    assert grad.shape == (2, 4, 16, 16)
    assert bool((grad[:, :, :, :8] == 0).all())  # the left half of 32 px is the left 8 of 16 latent columns
    assert bool((grad[:, :, :, 8:] != 0).all())
    assert torch.allclose(batch["mask"][1, 0, :, 8:], torch.tensor(128 / 255))

    # Across a batch: an image whose mask is all black adds nothing, whatever its pixels are.
    grads = []
    for seed in (1, 99):
        root = tmp_path / f"black{seed}"
        data = dataset(root, {"a": picture(seed), "b": picture(2)}, {"a": Image.new("L", (SIZE, SIZE), 0),
                                                                      "b": left_black()})
        t = trainer(model_dir, data, root / "out", masked_loss=True, mask_dir=str(root / "masks"))
        grads.append(loss_and_grads(t, ["a", "b"])[1])
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_loss_weights_average_by_area_and_keep_a_mean_of_one():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1.0  # one latent cell of four (2x2 pixels each) is white
    mask[0, 0, 2:, 2:] = 0.5
    w = loss_weights(mask, (2, 2))
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.5]]) / 0.375)
    assert torch.equal(w[1], torch.zeros(1, 2, 2))  # all black: nothing, not NaN
    partial = torch.zeros(1, 1, 4, 4)
    partial[0, 0, 0, 0] = 1.0  # a quarter of a cell is white: the cell counts a quarter
    assert torch.allclose(loss_weights(partial, (2, 2))[0, 0], torch.tensor([[4.0, 0.0], [0.0, 0.0]]))


def spot(arr: np.ndarray) -> tuple[float, float]:
    """(row, column) centroid of the marked pixels of a (H, W) array."""
    ys, xs = np.nonzero(arr > 0.5)
    return ys.mean(), xs.mean()


def test_crops_flips_and_buckets_move_the_mask_with_the_image(tmp_path):
    # A 64x40 picture with a red square at x 40-47, y 16-23, in a 48x16 bucket: scaled to 48x30, the square
    # at x 30-35, y 12-17, and cropped to 16 of the 30 rows, so a random crop moves it up and down, and
    # flips mirror it.
    img = Image.new("RGB", (64, 40), (0, 0, 0))
    img.paste((255, 0, 0), (40, 16, 48, 24))
    img.save(tmp_path / "a.png")
    full = Image.new("L", (64, 40), 0)
    full.paste(255, (40, 16, 48, 24))
    full.save(tmp_path / "mask.png")
    full.resize((32, 20), Image.Resampling.BOX).save(tmp_path / "half.png")  # a mask at another resolution
    seen = set()
    for mask in ("mask.png", "half.png"):
        example = Example(tmp_path / "a.png", "x", (48, 16), mask=tmp_path / mask)
        for s in range(16):
            flip = s % 2 == 1
            arr, _, (top, left), m = pixels(example, "random", flip, random.Random(s))
            assert m.shape == (1, 16, 48) and arr.shape == (3, 16, 48)
            if not 2 <= top <= 11:  # the square must lie whole inside the crop to compare centroids
                continue
            red = (arr[0].numpy() + 1) / 2
            (iy, ix), (my, mx) = spot(red), spot(m[0].numpy())
            assert abs(iy - my) < 0.5 and abs(ix - mx) < 0.5, (mask, s, top)
            assert (ix < 24) == flip  # the square is on the right, and on the left when flipped
            seen.add((top, flip))
    assert len({top for top, _ in seen}) >= 3 and {f for _, f in seen} == {False, True}


def test_alpha_masks_and_mask_files_give_the_same_loss(model_dir, tmp_path):
    rng = np.random.default_rng(3)
    alpha = np.zeros((SIZE, SIZE), dtype=np.uint8)
    alpha[4:28, 10:30] = 255
    alpha[0:4, :] = 100  # grey weights too
    rgba = np.concatenate([rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), alpha[..., None]], axis=2)
    (tmp_path / "alpha").mkdir()
    alpha_data = dataset(tmp_path / "alpha", {"a": Image.fromarray(rgba, "RGBA"), "b": picture(2)})
    # The same training pixels (transparency flattened onto white, as the trainer loads it) with the alpha
    # channel as a mask file; "b" has no alpha and no mask file: both train it whole.
    (tmp_path / "file").mkdir()
    file_data = dataset(tmp_path / "file", {"a": load_image(alpha_data / "a.png"), "b": picture(2)},
                        {"a": Image.fromarray(alpha, "L")})
    by_alpha = trainer(model_dir, alpha_data, tmp_path / "o1", masked_loss=True, alpha_mask=True)
    by_file = trainer(model_dir, file_data, tmp_path / "o2", masked_loss=True, mask_dir=str(tmp_path / "file/masks"))
    loss0, grads0, batch0 = loss_and_grads(by_alpha, ["a", "b"])
    loss1, grads1, batch1 = loss_and_grads(by_file, ["a", "b"])
    assert torch.equal(batch0["mask"], batch1["mask"])
    assert 0 < float(batch0["mask"][0].mean()) < 1 and bool((batch0["mask"][1] == 1).all())
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads0, grads1))


def test_the_latent_cache_key_follows_the_mask_file(make_pipe, tmp_path):
    vae = make_pipe("sd1").vae
    picture(1).save(tmp_path / "a.png")
    left_black().save(tmp_path / "m.png")
    example = Example(tmp_path / "a.png", "x", (SIZE, SIZE), mask=tmp_path / "m.png")
    disk = tmp_path / "cache"
    disk.mkdir()

    def cached():
        cache = LatentCache(vae, disk, "vae")
        cache.fill([example], (False,), progress=False)
        return cache.reused, cache.get(example, False)[4]

    reused, first = cached()
    assert reused == 0 and first.shape == (1, 16, 16) and float(first[0, 0, 0]) == 0 and float(first[0, 0, -1]) == 1
    assert cached()[0] == 1 and torch.equal(cached()[1], first)
    left_black(value=64).save(tmp_path / "m.png")  # same image, another mask
    reused, second = cached()
    assert reused == 0 and torch.allclose(second[0, :, -1], torch.tensor(64 / 255))
    plain = LatentCache(vae, disk, "vae")  # the unmasked entry is another key: no mask in it
    plain.fill([Example(tmp_path / "a.png", "x", (SIZE, SIZE))], (False,), progress=False)
    assert plain.reused == 0 and plain.get(Example(tmp_path / "a.png", "x", (SIZE, SIZE)), False)[4] is None


def test_missing_masks_warn_and_train_whole_and_bad_masks_stop(tmp_path):
    images = {n: picture(i) for i, n in enumerate("abcd")}
    data = dataset(tmp_path, images, {"a": left_black(), "b": left_black(), "c": left_black((16, 16))})
    lines = []
    cfg = TrainConfig(data=str(data), masked_loss=True, mask_dir=str(tmp_path / "masks"), bucket_step=16, workers=1)
    built = build_data(cfg, SIZE, log=lines.append)
    masks = {e.path.stem: e.mask for e in built.examples}
    assert masks == {"a": tmp_path / "masks/a.png", "b": tmp_path / "masks/b.png", "c": tmp_path / "masks/c.png",
                     "d": None}
    assert any(line.startswith("warning: 1 of 4 training images have no mask") for line in lines), lines

    left_black((16, 32)).save(tmp_path / "masks/b.png")  # another aspect ratio
    (tmp_path / "masks/c.png").write_bytes(b"not a png")
    with pytest.raises(ImgloraError) as e:
        build_data(cfg, SIZE, log=lines.append)
    line = e.value.line()
    assert "2 mask(s) cannot be used" in line and "b.png: 16x32 does not fit its image's 32x32" in line
    assert "c.png: not a supported image" in line and "imglora-data check" in line and "\n" not in line

    data = dataset(tmp_path / "inner", images)
    nested = data / "masks"  # a mask folder inside the data folder holds no training images
    nested.mkdir()
    left_black().save(nested / "d.png")
    inner = TrainConfig(data=str(data), masked_loss=True, mask_dir=str(nested), bucket_step=16, workers=1)
    assert {e.path.stem: e.mask for e in build_data(inner, SIZE, log=lines.append).examples} == \
        {"a": None, "b": None, "c": None, "d": nested / "d.png"}


@pytest.mark.parametrize("settings, words", [
    (dict(masked_loss=True), "--masked-loss needs one source of masks"),
    (dict(masked_loss=True, mask_dir="m", alpha_mask=True), "--mask-dir and --alpha-mask both given"),
    (dict(mask_dir="m"), "need --masked-loss"),
    (dict(masked_loss=True, alpha_mask=True, mask_floor=1.5), "--mask-floor must be at least 0 and at most 1"),
])
def test_mask_settings_are_checked(settings, words):
    with pytest.raises(ImgloraError, match=words):
        TrainConfig(data="d", **settings).check()


def test_mask_floor_and_a_short_masked_run(model_dir, tmp_path):
    from imglora.cli import main

    data = dataset(tmp_path, {"a": picture(1), "b": picture(2)}, {"a": left_black(), "b": left_black()})
    t = trainer(model_dir, data, tmp_path / "o", masked_loss=True, mask_dir=str(tmp_path / "masks"), mask_floor=0.25)
    batch = loss_and_grads(t, ["a", "b"])[2]
    assert float(batch["mask"].min()) == 0.25 and float(batch["mask"].max()) == 1.0
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--resolution", "32", "--bucket-step", "16", "--rank", "2", "--batch-size", "2", "--workers", "1",
                 "--masked-loss", "--mask-dir", str(tmp_path / "masks"), "--mask-floor", "0.1",
                 "--cache-latents", "disk"]) == 0
    assert (out / "lora.safetensors").is_file()
