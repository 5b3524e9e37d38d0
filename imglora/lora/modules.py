"""One layer's adapter tensors as files store them, a class per kind (LoRA/LoCon, LoHa, LoKr, full and norm
deltas, OFT/BOFT, (IA)³, GLoRA, each with optional DoRA), the ΔW each makes, and which kind a file's tensor
names are. lora/kinds.py holds the same kinds as they run inside a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _scalar(t) -> float:
    return float(t.item() if torch.is_tensor(t) else t)


@dataclass(eq=False)  # identity, not tensor comparison
class Module:
    """One adapted layer as a file holds it. The kinds (LoRA, LoHa, LoKr, a full delta) differ in how
    their tensors make ΔW; any of them may carry DoRA's magnitude (`dora_scale`), which then rescales
    the merged weight W0 + ΔW to that norm (per output row, or per input column)."""

    kind = "?"
    NAMES = {}  # dataclass field -> the tensor's name in files (kinds without an alpha use these as they are)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{suffix: tensor} as kohya/LyCORIS files write them (alpha as a float32 scalar)."""
        return {name: getattr(self, f) for f, name in self.NAMES.items() if getattr(self, f) is not None}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor]) -> "Module":
        return cls(**{f: parts.get(name) for f, name in cls.NAMES.items()})

    def raw_delta(self, shape) -> torch.Tensor:
        """ΔW at strength 1 before DoRA, in float32, with the base weight's shape."""
        raise NotImplementedError

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """What the module adds to the base weight at strength 1 (float32). DoRA needs the weight itself."""
        d = self.raw_delta(None if weight is None else tuple(weight.shape))
        if getattr(self, "dora_scale", None) is None:
            return d
        if weight is None:
            raise ValueError("a DoRA module's delta depends on the base weight")
        return dora_delta(weight.float(), d, self.dora_scale.float())

    def bias_delta(self) -> torch.Tensor | None:
        """What the module adds to the layer's bias (a full delta's diff_b), if anything."""
        return None

    def check(self) -> None:
        """The tensors fit together (ValueError if not); called on meta copies, so shapes only."""
        self.raw_delta()

    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.tensors().items() if k != "alpha")

    def on_meta(self) -> "Module":
        """The same module with its tensors on the meta device (shapes only); scalars such as alpha and
        on_input keep their values."""
        return self.from_tensors({k: t if t.numel() <= 1 else t.to("meta") for k, t in self.tensors().items()})

    def detached_copy(self) -> "Module":
        """Float32 CPU copies, independent of any live parameter."""
        return type(self).from_tensors({k: t.detach().float().cpu().clone() for k, t in self.tensors().items()})


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024, as LyCORIS and peft do it): W' = m · (W0 + ΔW) / ‖W0 + ΔW‖, the norm per output
    row when m has one value per row (out, 1, ...), else per input column (1, in, ...); returns W' - W0."""
    merged = weight + delta
    if magnitude.shape[0] == merged.shape[0] and (magnitude.dim() == 1 or magnitude.shape[1] == 1):
        norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (merged.dim() - 1))
        m = magnitude.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, *[1] * (merged.dim() - 2))
        m = magnitude.reshape(norm.shape)
    return merged * (m / (norm + torch.finfo(merged.dtype).eps)) - weight


class OptionalAlpha:
    """For kinds whose alpha may be absent (None; LoKr's, OFT's constraint, GLoRA's): written only when set."""

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        return out if self.alpha is None else {**out, "alpha": torch.tensor(float(self.alpha))}

    @classmethod
    def from_tensors(cls, parts):
        alpha = _scalar(parts["alpha"]) if "alpha" in parts else None
        return cls(alpha=alpha, **{f: parts.get(name) for f, name in cls.NAMES.items()})


@dataclass(eq=False)
class LoraModule(Module):
    """ΔW = (alpha / rank) · B @ A (LoRA, LoCon; with `mid`, LoCon's Tucker form B · mid · A)."""

    A: torch.Tensor  # (rank, in) for Linear; (rank, in, kh, kw) for Conv2d ((rank, in, 1, 1) with mid)
    B: torch.Tensor  # (out, rank) for Linear; (out, rank, 1, 1) for Conv2d
    alpha: float
    mid: torch.Tensor | None = None  # (rank, rank, kh, kw): LyCORIS's use_tucker
    dora_scale: torch.Tensor | None = None
    kind = "lora"

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.A, "lora_up.weight": self.B, "alpha": torch.tensor(float(self.alpha))}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor]) -> "LoraModule":
        A, B = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = _scalar(parts["alpha"]) if "alpha" in parts else float(A.shape[0])  # no alpha: scale 1
        return cls(A, B, alpha, parts.get("lora_mid.weight"), parts.get("dora_scale"))

    def detached_copy(self) -> "LoraModule":
        c = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
        return LoraModule(c(self.A), c(self.B), self.alpha, c(self.mid), c(self.dora_scale))

    def num_parameters(self) -> int:
        return sum(t.numel() for t in (self.A, self.B, self.mid, self.dora_scale) if t is not None)

    def raw_delta(self, shape=None) -> torch.Tensor:
        A, B = self.A.float(), self.B.float()
        if self.mid is not None:  # up (1x1) · mid (kxk) · down (1x1), as one kxk weight
            return self.scale * torch.einsum("or,rshw,si->oihw", B.flatten(1), self.mid.float(), A.flatten(1))
        if A.dim() == 2:
            d = B @ A
            return self.scale * (d if shape is None else d.reshape(shape))
        # Conv: a k×k down conv followed by a 1×1 up conv is one k×k conv with weight B·A.
        return self.scale * torch.einsum("or,rihw->oihw", B.flatten(1), A)


@dataclass(eq=False)
class LohaModule(Module):
    """LoHa (LyCORIS): ΔW = (alpha / rank) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); with Tucker cores t1/t2, each
    factor is rebuilt as t ×₁ w_a ×₂ w_b (conv layers)."""

    w1a: torch.Tensor  # (out, rank); with t1: (rank, out)
    w1b: torch.Tensor  # (rank, in·kh·kw); with t1: (rank, in)
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None  # (rank, rank, kh, kw)
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    kind = "loha"
    NAMES = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1",
             "t2": "hada_t2", "dora_scale": "dora_scale"}

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "alpha": torch.tensor(float(self.alpha))}

    @classmethod
    def from_tensors(cls, parts):
        get = {f: parts.get(name) for f, name in cls.NAMES.items()}
        alpha = _scalar(parts["alpha"]) if "alpha" in parts else float(get["w1b"].shape[0])
        return cls(alpha=alpha, **get)

    def raw_delta(self, shape=None) -> torch.Tensor:
        if self.t1 is not None:
            w1 = torch.einsum("ij...,jr,ip->pr...", self.t1.float(), self.w1b.float(), self.w1a.float())
            w2 = torch.einsum("ij...,jr,ip->pr...", self.t2.float(), self.w2b.float(), self.w2a.float())
            d = w1 * w2
        else:
            d = (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float())
        d = d * (self.alpha / self.rank)
        return d if shape is None else d.reshape(shape)


@dataclass(eq=False)
class LokrModule(OptionalAlpha, Module):
    """LoKr (LyCORIS): ΔW = scale · w1 ⊗ w2 (Kronecker product), each factor whole or as a low-rank pair
    (w2 for a conv also as a Tucker core t2). scale = alpha / rank of the decomposed factor, 1 when both
    are whole (ComfyUI's and A1111's rule)."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind = "lokr"
    NAMES = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
             "w2b": "lokr_w2_b", "t2": "lokr_t2", "dora_scale": "dora_scale"}

    @property
    def rank(self) -> int | None:
        return self.w2b.shape[0] if self.w2b is not None else (self.w1b.shape[0] if self.w1b is not None else None)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0


    def raw_delta(self, shape=None) -> torch.Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = torch.einsum("ij...,ip,jr->pr...", self.t2.float(), self.w2a.float(), self.w2b.float())
        else:
            r, o, *k = self.w2b.shape
            w2 = (self.w2a.float() @ self.w2b.float().reshape(r, -1)).reshape(-1, o, *k)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1, w2) * self.scale
        return d if shape is None else d.reshape(shape)


@dataclass(eq=False)
class FullModule(Module):
    """A full weight difference (LyCORIS `full`, ComfyUI's `diff`), with an optional bias difference."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    kind = "full"
    NAMES = {"diff": "diff", "diff_b": "diff_b", "dora_scale": "dora_scale"}

    def raw_delta(self, shape=None) -> torch.Tensor:
        d = self.diff.float()
        return d if shape is None else d.reshape(shape)

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()


@dataclass(eq=False)
class NormModule(Module):
    """A norm layer's weight and bias difference (LyCORIS's train_norm: `w_norm`, `b_norm`)."""

    w_norm: torch.Tensor | None = None
    b_norm: torch.Tensor | None = None
    kind = "norm"
    NAMES = {"w_norm": "w_norm", "b_norm": "b_norm"}

    def raw_delta(self, shape=None) -> torch.Tensor:
        if self.w_norm is None:
            return torch.zeros(shape if shape is not None else self.b_norm.shape, device=self.b_norm.device)
        d = self.w_norm.float()
        return d if shape is None else d.reshape(shape)

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.b_norm is None else self.b_norm.float()


class WeightModule(Module):
    """A kind whose ΔW is a function of the base weight itself (OFT, BOFT, (IA)³, GLoRA): `delta` needs it."""

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError(f"a {self.kind} module's delta depends on the base weight")
        return self.weight_delta(weight.float())

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self) -> None:
        """The tensors fit together (without a base weight: its shape is checked when the module is attached)."""


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """The orthogonal R = (I + Q)(I - Q)⁻¹ of each block, Q = blocks - blocksᵀ (skew-symmetric), with Q scaled
    down to Frobenius norm `constraint` (over all blocks together) when it is larger (LyCORIS's COFT)."""
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:  # a clamp rather than an if, so that shapes alone (meta tensors) go through
        q = q * torch.clamp(constraint / (q.norm() + 1e-8), max=1.0)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass(eq=False)
class OftModule(OptionalAlpha, WeightModule):
    """OFT (kohya's and LyCORIS's diag-OFT; 3-dim oft_blocks) and BOFT (LyCORIS's butterfly OFT; 4-dim): the base
    weight's output rows rotated block by block, W' = rescale · R·W0, so ΔW = W' - W0. alpha is the norm
    constraint per output (LyCORIS and A1111 clamp ‖Q‖ at alpha·out; ComfyUI at alpha). `oft_diag` (early
    LyCORIS, read by A1111) stores R itself."""

    blocks: torch.Tensor | None = None  # (n_blocks, size, size); BOFT: (stages, n_blocks, size, size)
    rescale: torch.Tensor | None = None  # (out, 1, ...)
    alpha: float | None = None
    diag: torch.Tensor | None = None
    NAMES = {"blocks": "oft_blocks", "rescale": "rescale", "diag": "oft_diag"}

    @property
    def kind(self) -> str:
        return "boft" if self.blocks is not None and self.blocks.dim() == 4 else "oft"


    def check(self) -> None:
        b = self.blocks if self.blocks is not None else self.diag
        if b.dim() not in (3, 4) or b.shape[-1] != b.shape[-2] or (self.diag is not None and b.dim() != 3):
            raise ValueError(f"OFT blocks {tuple(b.shape)} are not square blocks")
        if b.dim() == 4 and b.shape[-1] % 2:
            raise ValueError(f"BOFT blocks {tuple(b.shape)} have an odd size")

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        constraint = (self.alpha or 0.0) * weight.shape[0]
        if self.diag is not None:
            rotated = _rotate(weight, self.diag.float())
        elif self.blocks.dim() == 3:
            rotated = _rotate(weight, _cayley(self.blocks, constraint))
        else:
            rotated = _butterfly(weight, _cayley(self.blocks, constraint))
        if self.rescale is not None:
            rotated = rotated * self.rescale.float()
        return rotated - weight


def _rotate(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Each block of output rows times its rotation: rows (k·size + m) <- Σₙ r[k, n, m] · rows (k·size + n)."""
    k, size, _ = r.shape
    return torch.einsum("knm,kn...->km...", r, weight.unflatten(0, (k, size))).flatten(0, 1)


def _butterfly(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT: stage i permutes the rows so that rows 2^i·size/2 apart share a block, rotates the blocks, and
    permutes back (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization")."""
    stages, _, size, _ = r.shape
    x = weight
    for i in range(stages):
        stride = 2 ** i * (size // 2)
        x = x.unflatten(0, (-1, 2, stride)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, stride, 2)).transpose(1, 2).flatten(0, 2)
    return x


@dataclass(eq=False)
class Ia3Module(WeightModule):
    """(IA)³ (LyCORIS ia3): the base weight scaled per output row, or per input column when `on_input` is set:
    ΔW = W0 · w along that axis."""

    weight: torch.Tensor  # (out,) or (in,); a conv's (1, channels, 1, 1)
    on_input: torch.Tensor | None = None
    kind = "ia3"
    NAMES = {"weight": "weight", "on_input": "on_input"}

    def check(self) -> None:
        if self.on_input is not None and self.on_input.numel() != 1:
            raise ValueError(f"on_input has {self.on_input.numel()} values instead of one")

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        on_input = self.on_input is not None and bool(self.on_input.reshape(()).item())
        axis = [1] * weight.dim()
        axis[1 if on_input else 0] = -1
        return weight * self.weight.float().reshape(axis)


@dataclass(eq=False)
class GloraModule(OptionalAlpha, WeightModule):
    """GLoRA (LyCORIS glora): ΔW = (alpha / rank) · (W0 · a1 · a2 + b1 · b2), the first term on the input side
    of the base weight. LyCORIS 2+ writes a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in); earlier files (read by
    A1111) swap the roles of 1 and 2: a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r). The shapes tell which."""

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: float | None = None
    bm: torch.Tensor | None = None  # a Tucker core between b1 and b2 (conv)
    kind = "glora"
    NAMES = {"a1": "a1.weight", "a2": "a2.weight", "b1": "b1.weight", "b2": "b2.weight", "bm": "bm.weight"}

    def _form(self) -> bool:
        """True for LyCORIS 2+'s layout. A square layer fits both; then the rank is a2's smaller side."""
        s = lambda t: t.shape  # noqa: E731
        new = s(self.a1)[1] == s(self.a2)[0] == s(self.b1)[1] == s(self.b2)[0]
        old = s(self.a1)[0] == s(self.a2)[1] == s(self.b1)[0] == s(self.b2)[1]
        if new and old:
            return s(self.a2)[0] <= s(self.a2)[1]
        if not (new or old):
            raise ValueError("GLoRA a1/a2/b1/b2 do not share a rank")
        return new

    @property
    def rank(self) -> int:
        return self.a2.shape[0] if self._form() else self.a1.shape[0]


    def check(self) -> None:
        self._form()

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor:
        f = lambda t: t.float().flatten(1)  # noqa: E731
        new = self._form()
        (a_in, a_out), (up, down) = ((self.a1, self.a2), (self.b1, self.b2)) if new else \
            ((self.a2, self.a1), (self.b2, self.b1))
        through = torch.einsum("oi...,ij->oj...", weight, f(a_in))
        through = torch.einsum("or...,rj->oj...", through, f(a_out))
        if self.bm is not None:
            additive = torch.einsum("mn...,im,nj->ij...", self.bm.float(), f(up), f(down))
        else:
            additive = f(up) @ f(down)
        scale = self.alpha / self.rank if self.alpha else 1.0
        return scale * (through + additive.reshape(weight.shape))


# Which kind a module is, by the tensor names a file gives it (after the module name and a dot).
KIND_SUFFIXES = {
    LohaModule: {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    LokrModule: {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    FullModule: {"diff", "diff_b"},
    NormModule: {"w_norm", "b_norm"},
    LoraModule: {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    OftModule: {"oft_blocks", "oft_diag", "rescale"},
    Ia3Module: {"weight", "on_input"},
    GloraModule: {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"},
}
SHARED_SUFFIXES = {"alpha", "dora_scale"}
REQUIRED = {LohaModule: ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
            LokrModule: ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}),
            FullModule: ({"diff"},), NormModule: ({"w_norm"}, {"b_norm"}), LoraModule: ({"lora_down.weight", "lora_up.weight"},),
            OftModule: ({"oft_blocks"}, {"oft_diag"}), Ia3Module: ({"weight"},),
            GloraModule: ({"a1.weight", "a2.weight", "b1.weight", "b2.weight"},)}


def module_from_parts(name: str, parts: dict[str, torch.Tensor]) -> Module:
    """The module of one name from its {suffix: tensor}; ValueError naming the key for anything unknown,
    mixed or incomplete (never a silent partial load)."""
    kinds = [cls for cls, names in KIND_SUFFIXES.items() if names & parts.keys()]
    stray = parts.keys() - SHARED_SUFFIXES - set().union(*KIND_SUFFIXES.values())
    if stray:
        raise ValueError(f"unknown tensor {name}.{sorted(stray)[0]} (not a LoRA, LoHa, LoKr, OFT, BOFT, (IA)³, "
                         "GLoRA, full or norm key)")
    if len(kinds) != 1:
        raise ValueError(f"module {name} has " + ("no weights, only " + ", ".join(sorted(parts)) if not kinds else
                                                  "tensors of several kinds: " + ", ".join(sorted(parts))))
    cls = kinds[0]
    if cls is LokrModule:
        w2 = {"lokr_w2"} <= parts.keys() or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys()
        w1 = {"lokr_w1"} <= parts.keys() or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys()
        if not (w1 and w2):
            raise ValueError(f"module {name} lacks a LoKr factor (lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b)")
    elif not any(req <= parts.keys() for req in REQUIRED[cls]):
        missing = sorted(REQUIRED[cls][0] - parts.keys())[0]
        raise ValueError(f"module {name} lacks its {missing} weight" if cls is not LoraModule else
                         f"module {name} lacks its {missing.split('.')[0]} weight")
    if cls is LohaModule and ("hada_t1" in parts) != ("hada_t2" in parts):
        raise ValueError(f"module {name} has only one of hada_t1 and hada_t2")
    return cls.from_tensors(parts)
