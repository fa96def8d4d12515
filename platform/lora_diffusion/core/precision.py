"""The precision policy (`train.precision`): what dtype each tensor of a run is kept and computed in.

    fp32        the backbone cast to fp32, everything computed in fp32 (the CPU default)
    bf16-mixed  frozen backbone weights in the checkpoint's dtype (bf16 for LLaDA / Dream, fp32
                for MiniLM), every trainable parameter in fp32 (full fine-tuning: fp32 master
                weights of the whole backbone), optimiser state fp32, the forward and backward
                under torch.autocast(bfloat16); the loss and scores in fp32
    bf16        "bf16-true": frozen AND trainable weights in bf16, optimiser state bf16, no fp32
                master copy. Half the memory of full fine-tuning's state, but updates below
                bf16's resolution (8 bits of mantissa) are lost: opt in, never a default
    auto        bf16-mixed on a GPU that supports bf16, else fp32

Why autocast and not a bf16 cast of the trainable tensors: AdamW updates of a LoRA factor are
often below bf16's resolution relative to the weight; the public diffusion-LM trainers (LLaDA's
SFT, Dream's, dllm) train bf16 weights with fp32 adapters under autocast for the same reason.
Methods compute in their input's dtype (`x @ A.to(x.dtype).T`), so a hook is also right where no
autocast is active (a user's harness running the backbone in bf16).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import check_one_of

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


def resolve(precision: str, device: torch.device) -> str:
    """The concrete policy for `device`: `auto` made fp32 or bf16-mixed."""
    check_one_of(precision, PRECISIONS, "train.precision")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def cast_backbone(model: torch.nn.Module, policy: str) -> None:
    """Frozen weights' dtype, before a method is attached: fp32 upcasts a bf16 checkpoint, bf16
    downcasts an fp32 one, bf16-mixed keeps what the checkpoint stores."""
    if policy == "fp32":
        model.float()
    elif policy == "bf16":
        model.to(torch.bfloat16)


def cast_trainable(method: torch.nn.Module, policy: str) -> None:
    """Trainable parameters in fp32 (bf16 under `bf16`), whatever the backbone's dtype: PEFT
    makes its adapters in the base layer's dtype, and full fine-tuning trains the backbone's own
    tensors. A module computes in one dtype, so where a method trains part of a module (BitFit's
    biases of a bf16 Linear or LayerNorm), that module's frozen tensors join the trainable dtype:
    the only frozen weights not left in the checkpoint's dtype. `.data` is swapped so the
    Parameter objects (hooks, the optimizer) stay the same."""
    dtype = torch.bfloat16 if policy == "bf16" else torch.float32
    owners: dict[int, list[bool]] = {}  # tensor -> whether each module holding it trains a tensor
    for module in method.modules():
        own = list(module.parameters(recurse=False))
        for p in own:
            owners.setdefault(id(p), []).append(any(q.requires_grad for q in own))
    for p in method.parameters():
        # a tied tensor (BERT's decoder weight is the input embedding) keeps its dtype unless
        # every module holding it trains: the embedding's output must stay what its norm expects
        if p.is_floating_point() and p.dtype != dtype and (p.requires_grad or all(owners[id(p)])):
            p.data = p.data.to(dtype)


def fp32_region(device: torch.device):
    """Autocast switched off (a method's small fp32 computation inside the run's autocast)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast(policy: str, device: torch.device):
    """torch.autocast(bfloat16) for the bf16 policies on CPU and CUDA; nothing otherwise."""
    if policy in ("bf16-mixed", "bf16") and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
