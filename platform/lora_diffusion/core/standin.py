"""Real-size backbones without weights: a shipped config (core/backbone_configs/*.json, the facts of
a released config.json) or a model directory's config.json, built by the family's architecture on
the meta device (shapes only: the memory plan) or on a device with random weights in a dtype (a
GPU check of an 8B model where its weights are not at hand).

The architectures: LLaDA, Dream and MDLM ship their modeling code with their weights, so theirs
are the stand-ins in core/standins/ (the released module paths and parameter shapes); BERT,
RoBERTa and ModernBERT are transformers' own classes. A directory's own remote code never runs
here. The result is a `Backbone` whose tokenizer is `ConfigTokenizer`: its mask id comes from the
family (LLaDA, Dream, MDLM) or the config's `mask_token_id` (ModernBERT's tokenizer fact).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from . import families
from .backbone import Backbone, resolve_backbone
from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "backbone_configs"
STANDIN_PREFIX = "standin:"  # Backbone.source of a stand-in: not a loadable checkpoint

# family -> (configuration module, config class, modeling module, model class) in core/standins/
_REMOTE_ARCHITECTURES = {
    "llada": ("configuration_llada", "LLaDAConfig", "modeling_llada", "LLaDAModelLM"),
    "dream": ("configuration_dream", "DreamConfig", "modeling_dream", "DreamModel"),
    "mdlm": ("configuration_mdlm", "MDLMConfig", "modeling_mdlm", "MDLM"),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shipped_names() -> list[str]:
    """The shipped configs: llada-8b, dream-7b, modernbert-large, mdlm-owt."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config(source: str) -> tuple[str, dict]:
    """(name, config dict) of a shipped config name, a model directory (its config.json), a
    config.json file, or a packaged backbone name (`minilm`)."""
    if source in shipped_names():
        path = CONFIG_DIR / f"{source}.json"
    else:
        resolved = Path(resolve_backbone(source))
        path = resolved / "config.json" if resolved.is_dir() else resolved
    if not path.is_file():
        raise UserError(f"backbone: '{source}' is neither a shipped config ({', '.join(shipped_names())}) "
                        f"nor a model directory or file with a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"backbone: {path} is not a JSON config: {exc}".splitlines()[0]) from None
    return source if source in shipped_names() else str(path.parent), data


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (`torch_dtype`, or transformers 5's `dtype`)."""
    return _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)


class ConfigTokenizer:
    """What a plan or a GPU check needs of a tokenizer when there is none: the vocabulary size and
    the mask id (the family's, else the config's `mask_token_id`)."""

    def __init__(self, config: dict):
        self.vocab_size = int(config["vocab_size"])
        self.mask_token_id = config.get("mask_token_id")
        self.pad_token_id = config.get("pad_token_id")

    def __len__(self) -> int:
        return self.vocab_size


def _tokenizer(name: str, config: dict, family: families.BackboneFamily):
    """`ConfigTokenizer` where the family or the config gives the mask id; else a model
    directory's own tokenizer (BERT-family mask ids live there), run without remote code."""
    named = family.mask_token_id is not None or family.mask_is_last_id or "mask_token_id" in config
    if not named and Path(name).is_dir() and any(Path(name).glob("tokenizer*")):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError):
            pass
    return ConfigTokenizer(config)


def _model_class_and_config(family: families.BackboneFamily, config: dict):
    """The architecture that builds `family` and its config object, without running any code
    from a checkpoint directory."""
    left_out = ("auto_map", "torch_dtype", "dtype")
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in left_out}
    if family.name in _REMOTE_ARCHITECTURES:
        import importlib

        conf_mod, conf_cls, model_mod, model_cls = _REMOTE_ARCHITECTURES[family.name]
        conf = getattr(importlib.import_module(f"{__package__}.standins.{conf_mod}"), conf_cls)(**fields)
        return getattr(importlib.import_module(f"{__package__}.standins.{model_mod}"), model_cls), conf
    import transformers

    model_type = fields.pop("model_type", family.model_types[0])
    conf = transformers.AutoConfig.for_model(model_type, **fields)
    return transformers.AutoModelForMaskedLM.from_config, conf


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_standin(source: str, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None,
                  family: str = families.AUTO, seed: int = 0) -> Backbone:
    """The backbone of `source` (see `read_config`) built on `device`: "meta" for shapes only,
    else random weights (seeded) made directly there. `dtype`: the weights' dtype, default the
    checkpoint's (`checkpoint_dtype`): bf16 for LLaDA and Dream."""
    name, config = read_config(source)
    fam = families.detect(config, family)
    dtype = dtype or checkpoint_dtype(config)
    build, model_config = _model_class_and_config(fam, config)
    with torch.random.fork_rng(devices=[]), torch.device(device), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = build(model_config)
    model.eval()
    backbone = Backbone(model=model, tokenizer=_tokenizer(name, config, fam), source=f"{STANDIN_PREFIX}{name}",
                        family=fam)
    backbone.mask_token_id  # noqa: B018 - a family without a usable mask id fails here, named
    return backbone
