"""Multi-adapter inference: UNet forward time with N adapters at run time and merged, the cost of a
weight change, a batch of different blends, memory over load/switch/unload cycles; ours beside
diffusers+peft (`set_adapters`, `fuse_lora`) on the same UNet, runs interleaved, medians reported.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from imglora.lora.adapters import Adapters
from imglora.lora.modules import LoraModule
from imglora.lora.state import Adapter
from imglora.memory import trim_heap


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def memory_mb(device) -> float:
    """What load/unload cycles must keep flat: CUDA memory in use, or the process's RSS after a heap trim."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2 ** 20
    trim_heap()
    return rss_mb()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int = 1) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def random_adapter(unet, keys: list[str], rank: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        base = unet.get_submodule(key.split(".", 1)[1])
        base = getattr(base, "base", base)
        w = base.weight
        in_dims = tuple(w.shape[1:])
        A = torch.randn((rank, *in_dims), generator=g) * 0.02
        B = torch.randn((w.shape[0], rank, *((1, 1) if w.dim() == 4 else ())), generator=g) * 0.02
        modules[key] = LoraModule(A, B, float(rank))
    return Adapter(modules)


class UNetCall:
    def __init__(self, unet, batch: int, size: int, device, dtype):
        g = torch.Generator().manual_seed(0)
        latent = size // 8
        self.unet = unet
        self.x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
        self.t = torch.full((batch,), 500, device=device)
        ctx_dim = unet.config.cross_attention_dim
        self.ctx = torch.randn(batch, 77, ctx_dim, generator=g).to(device, dtype)
        self.extra = {}
        if unet.config.addition_embed_type == "text_time":
            self.extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                                                "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}}

    @torch.no_grad()
    def __call__(self):
        return self.unet(self.x, self.t, self.ctx, **self.extra).sample


def bench_inference(unet, device, dtype, size: int, batch: int = 1, counts=(1, 2, 4, 8), rank: int = 16,
                    reps: int = 3, cycles: int = 50, with_peft: bool = True, log=print) -> dict:
    """All inference numbers for one UNet. Every ratio is measured in adjacent pairs (base, then the
    configuration) and the median over `reps` pairs is reported, so slow drifts of a shared machine cancel."""
    unet.to(device, dtype).eval()
    holder = type("P", (), {})()
    holder.unet = unet
    ours = Adapters(holder)
    keys = ours.targets("transformer")
    adapters = [random_adapter(unet, keys, rank, seed=i) for i in range(max(counts))]
    calls = 5 if device.type == "cuda" else 1  # GPU forwards are short: time several per sample
    call = UNetCall(unet, batch, size, device, dtype)
    for i, a in enumerate(adapters):
        ours.load(f"a{i}", a, weight=0.0, dtype=dtype)

    def set_active(n):
        for i in range(len(adapters)):
            ours.set_weight(f"a{i}", 0.5 if i < n else 0.0)

    def measure(fn=call):
        fn()  # warm-up (and the cached stack after a change)
        return timed(fn, device, calls)

    ratios: dict[str, list[float]] = {}
    results: dict = {"modules": len(keys), "rank": rank, "size": size, "batch": batch}
    base_times = []
    for rep in range(reps):
        for n in counts:
            set_active(0)
            base = measure()
            base_times.append(base)
            set_active(n)
            ratios.setdefault(f"ours_runtime_{n}_x", []).append(measure() / base)
            ours.merge()
            ratios.setdefault(f"ours_merged_{n}_x", []).append(measure() / base)
            change = timed(lambda: ours.set_weight("a0", 0.4 + 0.01 * rep), device)  # a re-merge of the blend
            ratios.setdefault(f"ours_weight_change_merged_{n}_forwards", []).append(change / base)
            ours.unmerge()
    set_active(4)
    grid_call = UNetCall(unet, 4, size, device, dtype)
    blends = [{f"a{j}": 0.25 * (k + 1) * (j % 2 * 2 - 1) for j in range(4)} for k in range(4)]
    for _ in range(reps):
        ours.set_sample_weights(None)
        one = measure(grid_call)
        ours.set_sample_weights(blends)
        ratios.setdefault("ours_grid4_vs_batch4_x", []).append(measure(grid_call) / one)
    ours.set_sample_weights(None)
    results["base_forward_s"] = statistics.median(base_times)
    results["ours_weight_change_runtime_s"] = statistics.median(
        timed(lambda: ours.set_weight("a0", 0.3), device) for _ in range(reps))
    results.update({k: statistics.median(v) for k, v in ratios.items()})
    ours.remove_all()

    # Memory: load, switch weights and unload adapters many times; RSS (or CUDA memory) must stay flat.
    for _ in range(3):
        _cycle(ours, adapters[:2], dtype)
    start = memory_mb(device)
    for _ in range(cycles):
        _cycle(ours, adapters[:2], dtype)
    results["memory_growth_pct"] = 100 * (memory_mb(device) - start) / start
    log(f"ours: {results}")
    if with_peft:
        results.update(bench_peft(unet, keys, adapters, counts, call, device, reps, calls))
    return results


def random_kind(unet, keys: list[str], kind: str, rank: int, seed: int) -> Adapter:
    """A LoHa or LoKr adapter with random non-zero tensors (both factors), at about LoRA's magnitude."""
    from imglora.lora.kinds import new_module

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        base = unet.get_submodule(key.split(".", 1)[1])
        w = getattr(base, "base", base).weight
        m = new_module(kind, w.detach().float().cpu(), rank, float(rank), factor=8)
        modules[key] = type(m).from_tensors({k: t if k == "alpha" else torch.randn(t.shape, generator=g) * 0.05
                                             for k, t in m.tensors().items()})
    return Adapter(modules)


def bench_mixed(unet, device, dtype, size: int, rank: int = 16, reps: int = 3, cycles: int = 50, log=print) -> dict:
    """A blend of mixed kinds (two LoRA, one LoHa, one LoKr on the transformer layers) at run time: the
    forward beside the base forward, a weight change (and the forward after it) in base forwards, and
    memory over load/blend/unload cycles."""
    unet.to(device, dtype).eval()
    holder = type("P", (), {})()
    holder.unet = unet
    ours = Adapters(holder)
    keys = ours.targets("transformer")
    files = {"lora0": random_adapter(unet, keys, rank, 0), "lora1": random_adapter(unet, keys, rank, 1),
             "loha": random_kind(unet, keys, "loha", rank // 2, 2), "lokr": random_kind(unet, keys, "lokr", rank, 3)}
    call = UNetCall(unet, 1, size, device, dtype)
    calls = 5 if device.type == "cuda" else 1

    def load_all():
        for name, a in files.items():
            ours.load(name, a, weight=0.5, dtype=dtype)

    load_all()
    ratios: dict[str, list[float]] = {}
    for rep in range(reps):
        for name in files:
            ours.enable(name, False)
        call()
        base = timed(call, device, calls)
        for name in files:
            ours.enable(name, True)
        call()  # builds the dense ΔW once
        runtime = timed(call, device, calls)
        ratios.setdefault("mixed_runtime_x", []).append(runtime / base)
        change = timed(lambda: (ours.set_weight("loha", 0.3 + 0.01 * rep), call()), device) - runtime
        ratios.setdefault("mixed_weight_change_forwards", []).append(max(0.0, change) / base)
    results = {k: statistics.median(v) for k, v in ratios.items()}
    ours.remove_all()

    def cycle():
        load_all()
        ours.set_weight("lokr", 0.8)
        call()
        ours.enable("loha", False)
        call()
        ours.remove_all()

    for _ in range(3):
        cycle()
    start = memory_mb(device)
    for _ in range(cycles):
        cycle()
    results["mixed_memory_growth_pct"] = 100 * (memory_mb(device) - start) / start
    log(f"mixed kinds: {results}")
    return results


def bench_control(unet, device, dtype, size: int, rank: int = 16, reps: int = 3, steps: int = 20, log=print) -> dict:
    """Blend control at run time, two LoRA adapters on the transformer layers: a denoising step (apply the blend
    at that step, then one UNet forward) with a weight that changes at every step (loractl keyframes) beside
    the same step with constant weights; and a forward with block weights (non-zero in every block, so the
    work is the same) beside plain weights. Adjacent pairs, medians over `reps` runs of `steps` steps."""
    from imglora.lora.blocks import BLOCKS26
    from imglora.lora.schedule import Schedule
    from imglora.lora.state import Blend

    unet.to(device, dtype).eval()
    holder = type("P", (), {})()
    holder.unet = unet
    ours = Adapters(holder)
    keys = ours.targets("transformer")
    for i in range(2):
        ours.load(f"a{i}", random_adapter(unet, keys, rank, seed=i), dtype=dtype)
    call = UNetCall(unet, 1, size, device, dtype)
    plain = Blend({"a0": 0.7, "a1": 0.5})
    scheduled = Blend({"a0": 0.7, "a1": 0.5}, schedules={"a0": Schedule(keys=((0.0, 0.0), (1.0, 1.0)))})
    blocks = Blend({"a0": 0.7, "a1": 0.5}, blocks={"a0": tuple(0.3 + 0.05 * i for i in range(len(BLOCKS26)))})

    def run(blend) -> float:
        """The median step of a run: robust to the bursts of a shared machine within the run."""
        times = []
        for k in range(steps):
            times.append(timed(lambda: (ours.apply(blend, k, steps), call()), device))
        return statistics.median(times)

    ratios: dict[str, list[float]] = {}
    run(plain)
    for _ in range(reps):
        const = run(plain)
        ratios.setdefault("schedule_step_x", []).append(run(scheduled) / const)
        ours.apply(plain)
        call()
        flat = timed(call, device, 3)
        ours.apply(blocks)
        call()
        ratios.setdefault("block_weights_x", []).append(timed(call, device, 3) / flat)
    results = {k: statistics.median(v) for k, v in ratios.items()}
    results["control_step_s"] = const
    ours.remove_all()
    log(f"blend control: {results}")
    return results


def _cycle(ours, adapters, dtype):
    for i, a in enumerate(adapters):
        ours.load(f"c{i}", a, weight=0.5, dtype=dtype)
    ours.set_weight("c0", 0.8)
    ours.merge()
    ours.set_weight("c1", 0.2)
    ours.unmerge()
    ours.remove_all()


def bench_peft(unet, keys, adapters, counts, call, device, reps, calls) -> dict:
    """The same blends through peft layers (what diffusers' load_lora_weights + set_adapters builds)."""
    from peft import LoraConfig, set_peft_model_state_dict

    targets = [k.split(".", 1)[1] for k in keys]
    names = []
    for i, a in enumerate(adapters):
        name = f"p{i}"
        rank = next(iter(a.modules.values())).rank
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name=name)
        state = {}
        for key, m in a.modules.items():
            path = key.split(".", 1)[1]
            state[f"{path}.lora_A.weight"] = m.A
            state[f"{path}.lora_B.weight"] = m.B
        set_peft_model_state_dict(unet, state, adapter_name=name)
        names.append(name)
    unet.to(device, call.x.dtype)

    def measure():
        call()
        return timed(call, device, calls)

    ratios: dict[str, list[float]] = {}
    for _ in range(reps):
        for n in counts:
            unet.disable_adapters()
            base = measure()
            unet.enable_adapters()
            unet.set_adapters(names[:n], [0.5] * n)
            ratios.setdefault(f"peft_runtime_{n}_x", []).append(measure() / base)
        unet.set_adapters(names[:4], [0.5] * 4)
        fuse = timed(lambda: unet.fuse_lora(lora_scale=1.0, adapter_names=names[:4]), device)
        ratios.setdefault("peft_fuse_4_forwards", []).append(fuse / base)
        unet.unfuse_lora()
    unet.delete_adapters(names)
    return {k: statistics.median(v) for k, v in ratios.items()}
