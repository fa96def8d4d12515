"""Turn an encoder into a masked diffusion LM: continued training with the diffusion objective.

all-MiniLM-L6-v2 ships without an MLM head. Here the whole text is the "response" (nothing is
held clean), masked with probability t, and the model learns to denoise it with the 1/t-weighted
ELBO, on the unlabelled text of the task corpora (train splits only). `head` trains the MLM head
only (transform + output bias; the decoder is tied to the frozen input embeddings); `full`
trains everything. The result is a normal Hugging Face directory that `backbone:` accepts.
Masked-token accuracy is reported on held-out text (the validation splits), at fixed t values.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import diffusion, tasks
from .backbone import load_backbone
from .errors import UserError

CORPORA = ("sst2", "ag_news")  # classification tasks whose train text is unlabelled text here


def _texts(split: str, data_dir: str | None, limit: int | None, seed: int) -> list[str]:
    out = []
    for task in CORPORA:
        examples = tasks.load_split(task, split, data_dir, max_examples=limit, seed=seed)
        out += [e.prompt for e in examples]  # template + input text, never the label word
    return out


@torch.no_grad()
def masked_token_accuracy(backbone, texts: list[str], t_value: float, max_length: int = 64,
                          seed: int = 0, batch_size: int = 64) -> float:
    """Fraction of masked tokens predicted exactly, masking each token with probability t."""
    backbone.model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for i in range(0, len(texts), batch_size):
        batch = _encode_text(backbone.tokenizer, texts[i:i + batch_size], max_length)
        t = torch.full((batch.input_ids.shape[0],), t_value)
        noisy, masked = diffusion.apply_mask(batch, t, backbone.mask_token_id, "linear", gen)
        if not masked.any():
            continue
        pred = backbone.logits(noisy, batch.attention_mask, masked, t).argmax(-1)
        correct += int((pred == batch.input_ids[masked]).sum())
        total += int(masked.sum())
    return correct / max(total, 1)


def _encode_text(tokenizer, texts, max_length):
    # max_length - 3: [CLS], [SEP] and the one (empty-prompt) position encode() reserves
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 3] for t in texts]
    return diffusion.encode(tokenizer, [""] * len(texts), ids, max_length)


def prepare_backbone(out_dir: str, mode: str = "full", steps: int = 1500, batch_size: int = 32,
                     lr: float = 1e-4, seed: int = 0, backbone_name: str = "minilm",
                     data_dir: str | None = None, max_length: int = 64, overwrite: bool = False,
                     eval_texts: int = 1000, log=print) -> dict:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out: {out} is not empty (pass --overwrite to replace it)")
    train_texts = _texts("train", data_dir, None, seed)
    heldout = _texts("validation", data_dir, eval_texts // len(CORPORA), seed)
    torch.manual_seed(seed)
    backbone = load_backbone(backbone_name)
    model = backbone.model
    for name, p in model.named_parameters():
        is_head = not name.startswith(model.base_model_prefix + ".")
        p.requires_grad_(mode == "full" or is_head)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    before = {t: masked_token_accuracy(backbone, heldout, t) for t in (0.15, 0.5)}
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_texts), generator=gen)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(train_texts)]
        batch = _encode_text(backbone.tokenizer, [train_texts[i] for i in idx], max_length)
        for g in opt.param_groups:  # linear warmup, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, stats = diffusion.diffusion_loss(
            lambda ids, attn, sel, t: backbone.logits(ids, attn, sel, t), batch,
            backbone.mask_token_id, "linear", 1e-3, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log and (step + 1) % 100 == 0:
            log(f"step {step + 1:5d}  loss {float(loss):.3f}  masked acc {stats['masked_accuracy']:.3f}")
    train_time = time.perf_counter() - t0
    after = {t: masked_token_accuracy(backbone, heldout, t) for t in (0.15, 0.5)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    backbone.tokenizer.save_pretrained(out)
    result = {
        "out": str(out), "mode": mode, "steps": steps, "batch_size": batch_size, "lr": lr,
        "train_texts": len(train_texts), "heldout_texts": len(heldout),
        "heldout_note": "validation splits of " + ", ".join(CORPORA) + " (never trained on)",
        "heldout_masked_token_accuracy_before": {str(k): v for k, v in before.items()},
        "heldout_masked_token_accuracy_after": {str(k): v for k, v in after.items()},
        "train_time_s": train_time, "step_time_s": train_time / steps,
    }
    (out / "prepare_result.json").write_text(json.dumps(result, indent=2))
    return result
