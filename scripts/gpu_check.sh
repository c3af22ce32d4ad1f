#!/usr/bin/env bash
# The training engine's GPU check, for a lent CUDA machine that has torch but not our venv:
# LoRA, bf16, the tower-feature cache and resume, on CUDA, through the same tests as on CPU.
# Needs (carried in .device/, git-ignored): wheels/ with transformers==5.24.0 and pydicom==3.0.2,
# and cache/tiny-tokenizer/ with SmolLM2's tokenizer files (the GGUF is too big to carry). Fill it with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device/wheels transformers==5.24.0 pydicom==3.0.2
#   mkdir -p .device/cache/tiny-tokenizer && cp ~/.cache/dragonfly-med/tiny-untrained-v2/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .device/cache/tiny-tokenizer/
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site:. DRAGONFLY_CACHE=$PWD/.device/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "from accelerate import Accelerator; d = Accelerator().device; assert d.type == 'cuda', d; print('accelerate trains on', d)"
python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_lora.py tests/test_training_engine.py \
  -k "not tiny_default and not assemble and not eval_command" 2>&1 | tee "${OUT:-/tmp}/gpu-pytest.log"
