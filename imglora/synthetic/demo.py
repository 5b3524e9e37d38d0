"""`imglora demo`: teach the embedded model a shape it has never seen, and show what changed.

Synthesises a small dataset of a new shape under a made-up trigger word, trains an adapter (and the
word as a new token: pivotal tuning) on it, renders the same prompts with the base model and with the
adapter into a labelled PNG, and lets the judge (our shipped classifier) score the concept and the base
vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import TrainConfig
from ..errors import shell_word, shown
from .shapes import BACKGROUNDS, BASE_SHAPES, COLOURS, synth_shapes
from ..generate import GenerateArgs, generate, image_grid, save_png
from ..lora.adapters import Adapters
from ..pipeline import attach, load_model
from ..train.loop import train

# The concept: a shape the base model never saw, under a made-up word. The heart: the VAE reconstructs
# it exactly (the judge names 100% of reconstructions), while the star's thin points blur into a
# diamond in 8x8 latents (81%), which capped what any adapter could reach.
SHAPE, WORD = "heart", "zorbly"
# The recipe `benchmarks/quality.py` measures: rank-16 adapters on the UNet's ResNet convolutions (where a
# UNet this small keeps its shapes) and the text encoder, with prior preservation. Two additions make it
# hold on every dataset seed (the seed table in the README):
# - reg_uncond: a convolution adapter changes what the model draws for the empty prompt too (6 of 16
#   unprompted images became hearts), and classifier-free guidance subtracts that prediction at every
#   step, so the heart was half taken back out; regularisation images with the empty caption keep it
#   as the base drew it (concept 0.46 -> 0.79 on seed 2) ...
# - ... which lets the adapter's drift show on base prompts too (circles became hearts): pivotal tuning
#   (the trigger word as a new 2-vector token, trained at a high rate) carries the concept in the text, the
#   UNet adapter trains at half the old rate, and the regularisation images count twice.
RECIPE = dict(rank=16, targets="conv", train_text_encoder=True, lr=2e-3, text_encoder_lr=1e-3, steps=800,
              batch_size=16, lr_scheduler="cosine", warmup_steps=20, train_embedding=WORD, embedding_vectors=2,
              embedding_lr=1e-2, prior_loss_weight=2.0, reg_uncond=1.0)


@dataclass
class Score:
    concept: float  # trigger-word images showing the new shape in the prompted colour
    base: float  # base-vocabulary images with the prompted colour and shape


def concept_prompts(word: str, seeds: int) -> list[tuple[str, dict, int]]:
    return [(f"a {c} {word} on a white background", {"colour": c}, s) for c in COLOURS for s in range(seeds)]


def base_prompts(seeds: int) -> list[tuple[str, dict, int]]:
    return [(f"a {c} {s} on a white background", {"colour": c, "shape": s}, k)
            for s in BASE_SHAPES for c in COLOURS for k in range(seeds)]


def render_before_after(model, adapters, name: str, prompts, base=None) -> list[tuple]:
    """(before, after) images for each (prompt, labels, seed), both rendered in one batch of two blends, or
    with `base` (the model without the adapter) the before images from it: a token the adapter brought
    has no weight 0, so only the model without the token shows what the prompt did before."""
    out = []
    for prompt, labels, seed in tqdm(prompts, desc="before/after", unit="prompt", leave=False):
        if base is None:
            before, after = generate(model, GenerateArgs(prompt, seed=seed, blends=[{name: 0.0}, {name: 1.0}]),
                                     adapters)
        else:
            before = generate(base, GenerateArgs(prompt, seed=seed))[0]
            after = generate(model, GenerateArgs(prompt, seed=seed, blends=[{name: 1.0}]), adapters)[0]
        out.append((prompt, labels, before, after))
    return out


def accuracy(judge, images, labels: list[dict], shape: str | None) -> float:
    """Share of images the judge sees in the prompted colour and the prompted (or the new) shape."""
    preds = judge.predict(images)
    ok = [p["colour"] == lab["colour"] and p["shape"] == (shape or lab["shape"]) for p, lab in zip(preds, labels)]
    return sum(ok) / len(ok)


def score(judge, rendered, shape: str | None) -> tuple[float, float]:
    """Accuracy before and after for render_before_after's output."""
    labels = [r[1] for r in rendered]
    return accuracy(judge, [r[2] for r in rendered], labels, shape), accuracy(judge, [r[3] for r in rendered],
                                                                              labels, shape)


def score_adapter(model, adapters, name: str, word: str = WORD, shape: str = SHAPE, seeds: int = 4):
    """The judge's concept and base accuracy before and after, with the renders: ({scores}, concept, base)."""
    from .judge import load_judge

    judge = load_judge()
    # The trigger word as a token of its own (pivotal tuning): the before images come from the base model.
    bare = load_model(model.path) if word in model.pipe.tokenizer.get_added_vocab() else None
    concept = render_before_after(model, adapters, name, concept_prompts(word, seeds), bare)
    base = render_before_after(model, adapters, name, base_prompts(max(1, seeds // 2)), bare)
    (c0, c1), (b0, b1) = score(judge, concept, shape), score(judge, base, None)
    return {"concept_before": c0, "concept_after": c1, "base_before": b0, "base_after": b1}, concept, base


def synth_balanced(folder: Path, n: int, seed: int, masks_dir: Path | None = None, **kw) -> None:
    """`n` images spread evenly over the backgrounds (a subfolder each), colours balanced within each. Drawn
    at random instead, a seed can leave the white background (the one the scores prompt) with 8 of 60
    hearts and no blue one, and the concept score then measures that rather than the training.
    `masks_dir`: with a distractor shape beside each, and the masks in the same subfolders there."""
    for k, background in enumerate(BACKGROUNDS):
        count = n // len(BACKGROUNDS) + (k < n % len(BACKGROUNDS))
        synth_shapes(folder / background, count, seed=seed + 1000 * k, size=64, backgrounds=(background,),
                     masks_dir=masks_dir / background if masks_dir else None, **kw)


def run_demo(output: str = "imglora-demo", shape: str = SHAPE, word: str = WORD, seed: int = 0,
             n_images: int = 60, seeds: int = 4, steps: int | None = None, reg_images: int | None = None,
             overwrite: bool = True, log=print, **overrides) -> dict:
    t0 = time.perf_counter()
    out = Path(output)
    data = out / "data"
    reg = out / "regularisation"
    if not data.is_dir():
        synth_balanced(data, n_images, seed, shapes=(shape,), words={shape: word})
    # Prior preservation: renders of the shapes the model already knows keep base prompts as they were
    # while the trigger word learns the new one.
    reg_images = reg_images or n_images
    if not reg.is_dir():
        synth_balanced(reg, reg_images, seed + 1)
    log(f"dataset: {n_images} images of a {shape} captioned '{word}' in {data}, "
        f"{reg_images} of known shapes in {reg}")
    cfg = TrainConfig(data=str(data), output=str(out), name=word, seed=seed, overwrite=overwrite,
                      sample_prompts=[f"a red {word} on a white background", "a blue circle on a white background"],
                      reg_data=str(reg), **{**RECIPE, **({"steps": steps} if steps else {}), **overrides})
    cfg.check()
    path = train(cfg)
    model = load_model(None)
    adapters = Adapters(model.pipe)
    attach(model, adapters, path, name=word)
    scores, concept, base = score_adapter(model, adapters, word, word, shape, seeds)
    concept_before, concept_after = scores["concept_before"], scores["concept_after"]
    base_before, base_after = scores["base_before"], scores["base_after"]
    rows = concept[::seeds] + base[:: max(1, seeds // 2) * len(COLOURS)]
    grid = image_grid([im for r in rows for im in (r[2], r[3])], cols=2,
                      labels=[lab for _ in rows for lab in ("before", "after")],
                      row_labels=[r[0].split(" on ")[0][2:] for r in rows])
    grid_path = save_png(grid, out / "before-after.png", "imglora demo: rows are prompts; before | after",
                         overwrite=True)
    result = {"adapter": str(path), "grid": str(grid_path), "logs": str(out / "logs"),
              "concept_before": concept_before, "concept_after": concept_after, "base_before": base_before,
              "base_after": base_after, "base_change": base_after - base_before, "seconds": time.perf_counter() - t0}
    log(f"base prompts: accuracy {base_before:.2f} before, {base_after:.2f} after; took {result['seconds']:.0f} s")
    return result


def next_steps(r: dict, output: str, opening_ui: bool = False) -> str:
    """Where the demo's results are and the commands that open them (paths quoted for the shell)."""
    rerun = "imglora demo --ui" + ("" if output == "imglora-demo" else f" --output {shell_word(output)}")
    commands = [(f"imglora ui --adapters {shell_word(output)}", "the app, with the adapter ready to blend"),
                (f"tensorboard --logdir {shell_word(r['logs'])}", "the training curves"),
                (rerun, "train again, then open the app")]
    width = max(len(c) for c, _ in commands)
    lines = [f"before/after image: {shown(r['grid'])}",
             f"adapter:            {shown(r['adapter'])}",
             f"training logs:      {shown(r['logs'])}",
             "to look at them:"]
    lines += [f"  {c:<{width}}  # {why}" for c, why in commands]
    if opening_ui:
        lines.append("opening the app now ...")
    return "\n".join(lines)


def summary_line(r: dict) -> str:
    return f"concept_before={r['concept_before']:.2f} concept_after={r['concept_after']:.2f} " \
           f"base_change={r['base_change']:+.2f}"
