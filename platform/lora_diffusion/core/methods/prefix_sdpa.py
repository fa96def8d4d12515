"""Prefix tuning where the attention is a call, not a module that takes a cache (prefix.py's other
path): LLaDA (`LLaDABlock.attention` -> `F.scaled_dot_product_attention`), Dream
(`DreamSdpaAttention`), MDLM's DDiT blocks with sdpa, ModernBERT under sdpa attention.

While block i runs, `torch.nn.functional.scaled_dot_product_attention` is replaced by a wrapper
that prepends block i's prefix keys and values, [B, heads, P, head_dim], to k and v and extends
a given `attn_mask` by P always-visible columns; the block's forward hook (always_call, so also
after an exception) puts the original back. Queries, positions and the output length are
unchanged; rotary position embeddings are applied to k before the call, so the prefix has no
position, as the prefix of prefix.py's cache path has none. The replacement is process-global
for the duration of one block's forward: one model per process runs at a time (as everywhere
here; Ray workers are processes).

`probe` finds the width of each block's keys and, for the "tokens" init, records the keys and
values each block's attention computes while the backbone reads given words (Li & Liang's
init from real words).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

_ORIGINAL = F.scaled_dot_product_attention


def pad_mask(mask: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Prepend n_prefix visible key columns to an sdpa mask (bool: True = visible; additive: 0)."""
    pad_shape = (*mask.shape[:-1], n_prefix)
    if mask.dtype == torch.bool:
        pad = torch.ones(pad_shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _prefixed(key: torch.Tensor, value: torch.Tensor):
    """An sdpa that attends to the prefix (key, value [P, heads * head_dim]) first."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if is_causal:
            raise UserError("method: prefix tuning on a causal attention call is not supported")
        B, H, _, D = k.shape
        P = key.shape[0]
        pk = key.to(k.dtype).view(1, P, H, D).transpose(1, 2).expand(B, -1, -1, -1)
        pv = value.to(v.dtype).view(1, P, H, D).transpose(1, 2).expand(B, -1, -1, -1)
        if attn_mask is not None:
            attn_mask = pad_mask(attn_mask, P)
        return _ORIGINAL(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=attn_mask,
                         dropout_p=dropout_p, is_causal=False, **kwargs)
    return sdpa


def _install(fn):
    F.scaled_dot_product_attention = fn


def _restore(*_args):
    F.scaled_dot_product_attention = _ORIGINAL


def attach(layers, kv_of) -> list:
    """Hooks on every block: block i's attention calls see `kv_of(i)` = (key, value) [P, width]."""
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: _install(_prefixed(*kv_of(i)))))
        hooks.append(layer.register_forward_hook(_restore, always_call=True))
    return hooks


@torch.no_grad()
def probe(backbone, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [layers, n, heads * head_dim] each block's attention call computes while
    the backbone reads `ids` [1, n]. UserError if a block makes no sdpa call (another attention
    implementation, e.g. eager or flash-attn)."""
    seen: dict[int, tuple] = {}
    ids = ids.to(backbone.device)

    def recorder(i):
        def sdpa(q, k, v, *args, **kwargs):
            flat = (lambda x: x[0].transpose(0, 1).reshape(x.shape[2], -1))  # [n, heads * dim]
            seen[i] = (flat(k), flat(v))
            return _ORIGINAL(q, k, v, *args, **kwargs)
        return sdpa

    hooks = []
    for i, layer in enumerate(backbone.layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: _install(recorder(i))))
        hooks.append(layer.register_forward_hook(_restore, always_call=True))
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        backbone.logits(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool))
    finally:
        backbone.model.train(was_training)
        for h in hooks:
            h.remove()
        _restore()
    missing = [i for i in range(len(backbone.layers)) if i not in seen]
    if missing:
        raise UserError(f"method: prefix tuning on the {backbone.family.name} backbone needs its blocks' "
                        f"attention to call torch's scaled_dot_product_attention; block {missing[0]} "
                        f"does not (another attention implementation?)")
    return (torch.stack([seen[i][0] for i in range(len(seen))]),
            torch.stack([seen[i][1] for i in range(len(seen))]))
