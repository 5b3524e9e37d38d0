"""Real-scale SD 1.5 and SDXL pipelines from their public configs, with random weights, cached on disk.

Random weights cost exactly what trained ones do, and nothing is downloaded. The first build takes
a minute (SDXL: several); later runs load the cached folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CACHE = Path(os.environ.get("IMGLORA_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench-cache"))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
# SD 2.1: the same layout, per-block head counts, OpenCLIP-H's 1024-wide context, linear projections.
SD2_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, hidden_act="gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, clip_sample=False)


def build(kind: str) -> Path:
    """The cached diffusers folder of `sd15` or `sdxl`, built on first use."""
    folder = CACHE / kind
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, \
        UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imglora.models.tiny import load_clip_tokenizer, write_clip_tokenizer

    torch.manual_seed(0)
    tmp = CACHE / f".{kind}-building"
    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp / "tok", ["red", "circle", "square"]))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025 if kind == "sdxl" else 0.18215)
    scheduler = DDPMScheduler(**SCHEDULER)
    if kind == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                                       tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler)
    pipe.save_pretrained(tmp / "pipe")
    os.replace(tmp / "pipe", folder)
    return folder
