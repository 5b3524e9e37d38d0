"""imglora: LoRA training, interchange and blending for Stable-Diffusion-style image models."""

import logging

# Importing diffusers pulls in optional backends that announce, on every run, what they cannot do
# here (torchao's GPU-only kernels, torchvision-less image processors we never use). Users should see
# our output, not that; real errors from these libraries are still shown.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
              "transformers.utils.import_utils"):
    logging.getLogger(_name).setLevel(logging.ERROR)
