"""Two adapters that each teach the embedded model a new shape, stacked: does the normalised blend help?

Trains the demo recipe twice (the heart as 'zorbly', the ring as 'quimble'), loads both, and has the judge
score each concept alone, then both together with the plain blend (weights 1 and 1) and with the
normalised one (each layer's summed update kept within the norm of its largest single update), plus the
base prompts under each blend.

    python -m benchmarks.blend --out benchmarks/results/cpu-quality-blend.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=".bench-cache/blend", help="folder for the two training runs")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="benchmark-blend.json")
    args = p.parse_args(argv)

    from imglora.generate import GenerateArgs, generate
    from imglora.lora.adapters import Adapters
    from imglora.lora.state import Blend
    from imglora.pipeline import attach, load_model
    from imglora.synthetic.demo import accuracy, base_prompts, concept_prompts, run_demo
    from imglora.synthetic.judge import load_judge
    from imglora.threads import configure

    configure(None)
    concepts = {"zorbly": "heart", "quimble": "ring"}
    t0 = time.perf_counter()
    files = {}
    for word, shape in concepts.items():
        run = Path(args.work) / word
        adapter = run / f"{word}.safetensors"
        if not adapter.is_file():
            run_demo(str(run), shape=shape, word=word)
        files[word] = adapter
    model = load_model(None)
    adapters = Adapters(model.pipe)
    for word, f in files.items():
        attach(model, adapters, f, name=word)
    judge = load_judge()

    def scores(blend: Blend) -> dict:
        out = {}
        for word, shape in concepts.items():
            prompts = concept_prompts(word, args.seeds)
            images = [generate(model, GenerateArgs(pr, seed=s, blend=blend), adapters)[0] for pr, _, s in prompts]
            out[word] = accuracy(judge, images, [lab for _, lab, _ in prompts], shape)
        prompts = base_prompts(max(1, args.seeds // 2))
        images = [generate(model, GenerateArgs(pr, seed=s, blend=blend), adapters)[0] for pr, _, s in prompts]
        out["base"] = accuracy(judge, images, [lab for _, lab, _ in prompts], None)
        return out

    both = {w: 1.0 for w in concepts}
    result = {"concepts": concepts, "seeds": args.seeds,
              **{f"alone_{w}": scores(Blend({w: 1.0})) for w in concepts},
              "plain": scores(Blend(both)), "normalised": scores(Blend(both, normalize=True)),
              "seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
