"""Which layers of a pipeline get adapters (target presets), and swapping LoraLayer wrappers in and out."""

from __future__ import annotations

from torch import nn

from .layer import LoraLayer, NormLayer
from .state import CLIP_ROOT

UNET_PRESETS = ("cross-attn", "attn", "transformer", "conv")
ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP = ("fc1", "fc2")
# kohya's LoCon set (FORMATS.md §1.5): every Linear/Conv2d of the ResNet, down- and up-sampler blocks.
CONV_BLOCK_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def _is_target_layer(module: nn.Module, conv_kernels: bool) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return conv_kernels or module.kernel_size == (1, 1)
    return False


def unet_targets(unet: nn.Module, preset: str = "cross-attn") -> list[str]:
    """Module paths in the UNet for a preset.

    cross-attn: attn2 to_q/to_k/to_v/to_out.0; attn: attn1 and attn2; transformer: every Linear and 1×1
    conv inside the transformer blocks (as kohya); conv: transformer plus the ResNet blocks' convolutions.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}")
    names = []
    if preset in ("cross-attn", "attn"):
        attns = ("attn2",) if preset == "cross-attn" else ("attn1", "attn2")
        suffixes = tuple(f".{a}.{p}" for a in attns for p in ATTN_PROJ)
        return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, LoraLayer)) and n.endswith(suffixes)]
    roots = [(n, False) for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    if preset == "conv":
        roots += [(n, True) for n, m in unet.named_modules() if type(m).__name__ in CONV_BLOCK_CLASSES]
    for root, conv_kernels in roots:
        for name, module in unet.get_submodule(root).named_modules():
            if not name or ".base" in name or name.endswith("base"):
                continue
            module = module.base if isinstance(module, LoraLayer) else module
            if _is_target_layer(module, conv_kernels):
                names.append(f"{root}.{name}")
    return names


def text_encoder_targets(text_encoder: nn.Module, mlp: bool = False) -> list[str]:
    """q/k/v/out projections of every CLIP layer (all four together: FORMATS.md §0.4), optionally fc1/fc2,
    as canonical paths (`text_model.encoder.layers.N…`, see state.py) whatever the installed transformers."""
    wanted = TE_ATTN + (TE_MLP if mlp else ())
    prefix = "" if hasattr(text_encoder, "text_model") else CLIP_ROOT
    return [prefix + n for n, m in text_encoder.named_modules()
            if isinstance(m, (nn.Linear, LoraLayer)) and n.rsplit(".", 1)[-1] in wanted and ".base" not in n]


def live_path(root: nn.Module, path: str) -> str:
    """A canonical module path in the installed module tree: CLIPTextModel lost its `text_model` level
    in transformers 5 (CLIPTextModelWithProjection kept it)."""
    if path.startswith(CLIP_ROOT) and not hasattr(root, "text_model"):
        return path[len(CLIP_ROOT):]
    return path


def find(root: nn.Module, path: str) -> nn.Module:
    """root's module at a canonical path (AttributeError if there is none)."""
    return root.get_submodule(live_path(root, path))


def wrap(root: nn.Module, path: str) -> LoraLayer:
    """Replace root.<path> by a LoraLayer around it (or return the one already there)."""
    module = find(root, path)
    if isinstance(module, LoraLayer):
        return module
    if isinstance(module, NormLayer.NORMS):
        layer = NormLayer(module)
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        layer = LoraLayer(module)
    else:
        raise ValueError(f"{path} is a {type(module).__name__}, not a Linear, Conv2d or norm layer")
    put_back(root, path, layer)
    return layer


def unwrap(root: nn.Module, path: str) -> None:
    """Put the original module back in place of the LoraLayer at root.<path>."""
    module = find(root, path)
    if isinstance(module, LoraLayer):
        put_back(root, path, module.base)


def put_back(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set root.<path> (a canonical path) to `module`."""
    parent_path, _, child = live_path(root, path).rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)
