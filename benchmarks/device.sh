#!/usr/bin/env bash
# GPU benchmarks on a lent H100/H200 (the `device` tool runs this in a copy of the repo).
# Carries: .whl (diffusers, datasets and what they need, for Python 3.12) and .peer (diffusers'
# examples/text_to_image/train_text_to_image_lora*.py from a diffusers checkout; never committed).
#   bash benchmarks/device.sh smoke|sd15|sdxl|infer
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export IMGLORA_BENCH_CACHE=/tmp/bench-cache
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch,diffusers,peft,transformers,accelerate,datasets;print('torch',torch.__version__,'diffusers',diffusers.__version__,'peft',peft.__version__,'transformers',transformers.__version__,'accelerate',accelerate.__version__)"
case "${1:-smoke}" in
smoke)
    python3 - <<'PY'
from imglora.models.tiny import tiny_sd_pipeline
from imglora.data.synth import synth_shapes
tiny_sd_pipeline("/tmp/tiny/tok").save_pretrained("/tmp/tiny/m")
synth_shapes("/tmp/tiny/data", 16, size=32)
PY
    python3 -m imglora.cli train --model /tmp/tiny/m --data /tmp/tiny/data --output /tmp/tiny/o --steps 20 \
        --resolution 32 --bucket-step 16 --mixed-precision bf16 --device cuda --sample-prompt "a red circle" \
        --sample-steps 2 --targets attn 2>&1 | tail -5
    python3 -m benchmarks.run --suite training --model /tmp/tiny/m --size 32 --batch 4 --steps 10 --reps 1 \
        --dtype bf16 --device cuda --diffusers-script .peer/train_text_to_image_lora.py --out $OUT/smoke.json
    ;;
sd15)
    python3 -m benchmarks.run --suite training --model sd15 --size 512 --batch 8 --steps 60 --reps 2 \
        --dtype bf16 --device cuda --variants compile,checkpointing,int8 \
        --diffusers-script .peer/train_text_to_image_lora.py --out $OUT/train-sd15.json
    python3 -m benchmarks.run --suite inference --model sd15 --size 512 --batch 1 --reps 5 --dtype bf16 \
        --device cuda --out $OUT/infer-sd15.json
    ;;
sdxl)
    python3 -m benchmarks.run --suite training --model sdxl --size 1024 --batch 1 --steps 30 --reps 2 \
        --dtype bf16 --device cuda --variants checkpointing,int8 \
        --diffusers-script .peer/train_text_to_image_lora_sdxl.py --out $OUT/train-sdxl.json
    ;;
infer)
    python3 -m benchmarks.run --suite inference --model sd15 --size 512 --batch 1 --reps 5 --dtype bf16 \
        --device cuda --out $OUT/infer-sd15.json
    ;;
esac
