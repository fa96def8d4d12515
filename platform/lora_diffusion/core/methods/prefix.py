"""Prefix tuning (Li & Liang 2021): learned key/value vectors prepended in every self-attention.

PEFT's prefix tuning hands the prefix to the model as `past_key_values`; BERT encoders in
transformers 5 do not take a cache unless configured as decoders (BertModel forces
use_cache=False, builds the bidirectional mask without the prefix length and shifts position ids
by the cache length), and `Backbone.logits` calls `model.base_model` directly, below any
PeftModel wrapper. So the prefix is implemented here, with the same mechanism HF uses for a
cache: a forward pre-hook on each `BertSelfAttention` passes a one-layer "cache" whose `update`
returns [P_k; K] and [P_v; V], and extends the attention mask by n_prefix always-visible columns.
Queries, positions and the output length are unchanged. Families whose attention is a call to
torch's scaled_dot_product_attention rather than a module taking a cache (LLaDA, Dream, MDLM,
ModernBERT) get the same prefix inside that call instead (prefix_sdpa.py).

Parameters per layer: P_k, P_v [n_prefix, all_head_size]. With `prefix.projection: H > 0` they are
instead Li & Liang's reparameterisation (PEFT's `prefix_projection`): every layer's P_k, P_v come
from one MLP, seeds [n_prefix, hidden] -> Linear(hidden, H) -> tanh -> Linear(H, layers x 2 x
all_head_size), recomputed before each forward. The seeds and the MLP are what trains. What is saved
and counted is `prefix.save`: "prefix" (default) saves the P_k, P_v the MLP computes, in the same
form as a direct prefix, and drops the MLP, as Li & Liang do and as PEFT saves a prefix adapter
(`get_prompt_embedding_to_save`); the MLP then travels only in resume checkpoints
(`training_state`). "mlp" saves and counts the seeds and the MLP instead, for a budget that holds
every tensor that trained.
Init "tokens" (Li & Liang's advice to initialise from real words): P_k, P_v are the keys and
values each layer computes while the backbone reads n_prefix seeded random words.

Unlike the other methods, prefix tuning changes the output at initialisation (the prefix is
attended to from the first step): there is no zero-init that removes a key from a softmax.
It does not depend on t: the prefix is used with or without a context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check, check_one_of
from . import prefix_sdpa
from .base import Method
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class PrefixConfig:
    """Prefix tuning: learned key/value vectors prepended to every self-attention layer."""

    length: int = 16  # prefix vectors per layer (the size knob)
    init: str = "tokens"  # tokens: keys/values of random words read by the backbone | random
    init_std: float = 0.02  # std of the "random" init
    projection: int = 0  # > 0: Li & Liang's reparameterisation MLP of this width (init ignored)
    # With a projection, what is saved and counted: "prefix" = the key/values the MLP computes
    # (Li & Liang drop the MLP after training; PEFT saves the prefix), "mlp" = the seeds and MLP
    save: str = "prefix"


def validate(pc: PrefixConfig) -> None:
    check(pc.length >= 1, "prefix.length", f"must be >= 1, got {pc.length}")
    check_one_of(pc.init, ("tokens", "random"), "prefix.init")
    check(pc.init_std > 0, "prefix.init_std", "must be > 0")
    check(pc.projection >= 0, "prefix.projection", f"must be >= 0 (0 = no MLP), got {pc.projection}")
    check_one_of(pc.save, ("prefix", "mlp"), "prefix.save")


class _PrefixCache:
    """Quacks like the part of `transformers.Cache` that BertSelfAttention calls."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value  # [B, heads, P, head_dim]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return (torch.cat([self.key.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.value.to(value_states.dtype), value_states], dim=2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the prefix takes no positions


def _extend_mask(mask: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """Prepend n_prefix visible key columns to a 4-D [B, 1, Q, K] mask (bool or additive)."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise UserError(f"method: prefix tuning expects a 4-D attention mask, got shape {tuple(mask.shape)}")
    return prefix_sdpa.pad_mask(mask, n_prefix)


def _word_token_ids(tokenizer, n: int, gen: torch.Generator) -> torch.Tensor:
    """n seeded random vocabulary entries that are whole or partial words (no special, unused or
    punctuation tokens, whose embeddings are often untrained)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    words = [i for i, tok in enumerate(vocab) if i not in special and tok
             and tok.lstrip("#\u0120\u2581").isalpha() and not tok.startswith("[")]
    if not words:
        raise UserError("method: prefix.init=tokens found no word tokens in the tokenizer; use prefix.init=random")
    pick = torch.randint(0, len(words), (n,), generator=gen)
    return torch.tensor([words[i] for i in pick.tolist()])


@torch.no_grad()
def _word_activations(backbone: Backbone, attns: list[nn.Module], n: int, gen: torch.Generator):
    """Li & Liang's init from real words: each layer's own key and value projections while the
    backbone reads n random words. At init the model then sees n extra words of context in every
    layer, a small change; projecting raw embeddings with deep layers' weights instead gives keys
    far outside those layers' distribution, and the prefix swamps the attention (measured: MLM loss
    8.7 over the first 50 steps on SST-2 with MiniLM, against 3.4 now)."""
    ids = _word_token_ids(backbone.tokenizer, n, gen)[None].to(backbone.device)
    keys, values, hooks = [], [], []
    for attn in attns:
        hooks.append(attn.key.register_forward_hook(lambda _m, _i, out: keys.append(out[0])))
        hooks.append(attn.value.register_forward_hook(lambda _m, _i, out: values.append(out[0])))
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        backbone.model.train(was_training)
        for h in hooks:
            h.remove()
    return torch.stack(keys), torch.stack(values)  # [layers, n, all_head_size] each


def _per_head(key: torch.Tensor, value: torch.Tensor, heads: int, batch: int):
    """[P, all_head_size] x2 -> [batch, heads, P, head_dim] x2 (expanded, not copied, over batch)."""
    P, D = key.shape
    shape = (1, P, heads, D // heads)
    return (key.reshape(shape).transpose(1, 2).expand(batch, -1, -1, -1),
            value.reshape(shape).transpose(1, 2).expand(batch, -1, -1, -1))


def _bert_attentions(backbone: Backbone) -> list[nn.Module] | None:
    """Every block's BertSelfAttention-like module (query/key/value projections, takes a cache),
    or None when the blocks have none (the family's attention is an sdpa call: prefix_sdpa.py)."""
    attns = [getattr(getattr(layer, "attention", None), "self", None) for layer in backbone.layers]
    if not all(a is not None and all(hasattr(a, n) for n in ("key", "value", "num_attention_heads"))
               for a in attns):
        return None
    if backbone.config._attn_implementation not in ("eager", "sdpa"):
        raise UserError(f"method: prefix tuning supports eager/sdpa attention, not "
                        f"{backbone.config._attn_implementation}")
    return attns


class PrefixLayer(nn.Module):
    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key = nn.Parameter(key)  # [P, all_head_size]
        self.value = nn.Parameter(value)


class PrefixMethod(Method):
    name = "prefix"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        pc = config.prefix
        self.n_prefix, self.n_layers = pc.length, len(backbone.layers)
        gen = torch.Generator().manual_seed(config.train.seed)
        attns = _bert_attentions(backbone)  # None: the family's attention is an sdpa call
        if attns is None and config.train.gradient_checkpointing:
            # the swap of the attention call happens in each block's hooks, around its forward;
            # a checkpointed block's recomputation in backward runs the forward alone
            raise UserError(f"field train.gradient_checkpointing: prefix tuning on the {backbone.family.name} "
                            "backbone swaps its attention call around each block's forward, which a "
                            "recomputed block does not repeat; set it to false (or use the bert family)")
        if attns is None:
            words = _word_token_ids(backbone.tokenizer, pc.length, gen)[None]
            keys, values = prefix_sdpa.probe(backbone, words)
            width = keys.shape[-1]
        else:
            self.heads, width = attns[0].num_attention_heads, attns[0].key.out_features
            if pc.init == "tokens" and not pc.projection:
                keys, values = _word_activations(backbone, attns, pc.length, gen)
        self._hooks = []
        if pc.projection:  # Li & Liang's reparameterisation: the MLP trains and is saved
            with torch.random.fork_rng():
                torch.manual_seed(config.train.seed)
                self.prefix_seeds = nn.Parameter(torch.randn(pc.length, backbone.hidden_size))
                self.prefix_mlp = nn.Sequential(
                    nn.Linear(backbone.hidden_size, pc.projection), nn.Tanh(),
                    nn.Linear(pc.projection, self.n_layers * 2 * width))
            self._table = None  # [layers, 2, P, width], recomputed before every forward
            self._loaded = None  # a saved prefix (load_saved): used instead of the MLP's output
            self._hooks = [backbone.encoder.register_forward_pre_hook(self._project)]
        else:
            if pc.init != "tokens":
                shape = (self.n_layers, pc.length, width)
                keys = torch.randn(shape, generator=gen) * pc.init_std
                values = torch.randn(shape, generator=gen) * pc.init_std
            self.prefixes = nn.ModuleList(PrefixLayer(k.clone(), v.clone()) for k, v in zip(keys, values))
        if attns is None:
            self._hooks += prefix_sdpa.attach(backbone.layers, self._prefix_of)
        else:
            self._hooks += [attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                            for i, attn in enumerate(attns)]

    def _prefix_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's (key, value) [P, width]: from the MLP's table or the direct parameters."""
        if self.config.prefix.projection:
            return self._table[i][0], self._table[i][1]
        return self.prefixes[i].key, self.prefixes[i].value

    def _project(self, _module, _args):
        """Before every backbone forward: all layers' prefixes from the MLP, in one graph."""
        if self._loaded is not None and torch.is_grad_enabled():
            raise UserError("method: this prefix was loaded from its saved form, without the MLP that "
                            "trains it (method_train.safetensors in a resume checkpoint): it can be "
                            "evaluated, not trained further")
        self._table = self._loaded if self._loaded is not None else self._computed_table()

    def _computed_table(self) -> torch.Tensor:
        out = self.prefix_mlp(self.prefix_seeds)  # [P, layers * 2 * width]
        return out.view(self.n_prefix, self.n_layers, 2, -1).permute(1, 2, 0, 3)  # [layers, 2, P, width]

    # --- with a projection and save: prefix, the file holds the computed prefix -------------
    def _saves_prefix(self) -> bool:
        return bool(self.config.prefix.projection) and self.config.prefix.save == "prefix"

    def _saved_names(self) -> list[str]:  # the names of a direct prefix's parameters
        return [f"prefixes.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]

    def state_to_save(self) -> dict[str, torch.Tensor]:
        if not self._saves_prefix():
            return super().state_to_save()
        with torch.no_grad():
            table = self._loaded if self._loaded is not None else self._computed_table()
        flat = table.reshape(self.n_layers * 2, *table.shape[2:])  # layer-major: key, value, key, ...
        return {name: t.detach().contiguous() for name, t in zip(self._saved_names(), flat)}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """A saved prefix replaces the MLP's output until `load_training_state` restores the MLP."""
        if not self._saves_prefix():
            return super().load_saved(tensors)
        expected = set(self._saved_names())
        if set(tensors) != expected:
            hint = (" (it holds the MLP: saved with prefix.save=mlp, or before that option existed; "
                    "load it with --set prefix.save=mlp)" if any(k.startswith("prefix_") for k in tensors) else "")
            raise ValueError(f"checkpoint does not match the method: missing {sorted(expected - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:3]}{hint}")
        self._loaded = torch.stack([tensors[n] for n in self._saved_names()]).view(
            self.n_layers, 2, self.n_prefix, -1)

    def training_state(self) -> dict[str, torch.Tensor]:
        return super().state_to_save() if self._saves_prefix() else {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self._saves_prefix():
            return super().load_training_state(tensors)
        super().load_saved(tensors)  # the seeds and the MLP, which compute the prefix again
        self._loaded = None

    def _hook(self, i: int):
        def hook(_module, args, kwargs):
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise UserError("method: prefix tuning cannot run with a key/value cache")
            if kwargs.get("encoder_hidden_states") is not None:
                return args, kwargs  # cross-attention: no prefix
            hidden = args[0] if args else kwargs["hidden_states"]
            k, v = _per_head(*self._prefix_of(i), self.heads, hidden.shape[0])
            kwargs = dict(kwargs)
            kwargs["cache"] = _PrefixCache(k, v)
            if len(args) > 1:  # attention_mask given positionally
                args = (args[0], _extend_mask(args[1], self.n_prefix), *args[2:])
            else:
                kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), self.n_prefix)
            return args, kwargs
        return hook


# Baseline comparison: prefix tuning moves few, scale-sensitive parameters (small rates), and
# trains through Li & Liang's reparameterisation MLP, of their width 512, saving and counting the
# prefix it computes (`prefix.save: prefix`), as Li & Liang and PEFT do. Single seed, SST-2, 400
# dev rows, 800 steps, 16 tokens: width 512 0.8275 at lr 3e-4; width 384 (PEFT's default, the
# hidden size) 0.800 at 3e-4 and 0.805 at 5e-4 (3 seeds, whole dev split: 0.799 +- 0.007 at
# 3e-4), 0.74 at 1e-4, chance at 1e-3 and 3e-3. Trained directly, the prefix stayed at chance
# (0.51-0.52 through 300-400 steps at 1e-3, 3e-3, 1e-2). Counting the MLP instead
# (`prefix.save: mlp`) leaves it width 12 x 24 tokens at this budget: 0.766 +- 0.012 over 3 seeds
# on the whole dev split (lr 5e-3; width 8 x 76 tokens 0.745, width 4 x 128 0.56, one seed).
SPEC = MethodSpec(name="prefix", method=PrefixMethod, order=3, section=PrefixConfig,
                  validate=validate, size_knob="prefix.length", lr_grid=(3e-4, 5e-4),
                  comparison_sets={"prefix.projection": 512},
                  # width of the reparameterisation MLP (the prefix it computes is what is counted)
                  tuning={"prefix.projection": (256, 512), "prefix.length": (16, 32)})
