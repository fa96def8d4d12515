"""The GPU check: one LLaDA-8B-shaped training step on one GPU, no Ray, MLflow, Optuna or datasets.

    python jobs/gpu_check.py --out gpu_check.json          # on a GPU machine (about 5 minutes)
    PYTHONPATH=platform python jobs/gpu_check.py           # on a bare one, the package not installed
    python jobs/gpu_check.py --size tiny                   # the CPU smoke version (CI runs it)

PEFT LoRA (r = 32, every linear layer) and trajectory LoRA (r = 32, mid-depth) with activation
checkpointing off and on under bf16-mixed, PEFT LoRA also under fp32: step time, tokens/s, peak
memory, model FLOP utilisation, the sampler's per-step cost, the loss on a repeated batch. Exit 1
if a loss is not finite or does not fall. A thin wrapper of `lora-diffusion gpu-check`
(lora_diffusion/experiments/bench/gpu.py).
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['gpu-check', *sys.argv[1:]]))
