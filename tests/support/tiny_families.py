"""Tiny random models of every backbone family, built offline into local directories that
`load_backbone` loads by the family's own loader.

BERT, RoBERTa and ModernBERT come from transformers' own classes with tiny configs. LLaDA,
Dream and MDLM ship their code with their weights and that code is not installable here, so
their directories are laid out as the real hub repositories are: config.json with `auto_map`,
configuration_*.py and modeling_*.py (the stand-ins in lora_diffusion/core/standins/, with the SAME module paths
and forward signatures as the released code, each file says which), safetensors weights, a
tokenizer. Loading them goes through `trust_remote_code`, the real path.

Tokenizers: MiniLM's WordPiece vocabulary padded with filler entries so that the family's real
mask id holds the family's mask token (LLaDA 126336 `<|mdm_mask|>`, Dream 151666 `<|mask|>`,
MDLM 50257, the last id); the models use the real vocabulary sizes at width 16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lora_diffusion.core import standins

REMOTE = Path(standins.__file__).parent  # the package's stand-in modeling files
FAMILIES = ("bert", "roberta", "modernbert", "llada", "dream", "mdlm")
WIDTH = dict(hidden=16, layers=2, heads=2, ffn=32)

# family -> (model_type, architecture, auto_map, config fields, mask token, mask id)
REMOTE_FAMILIES = {
    "llada": ("llada", "LLaDAModelLM", {"AutoConfig": "configuration_llada.LLaDAConfig",
                                         "AutoModel": "modeling_llada.LLaDAModelLM",
                                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
              dict(d_model=16, n_heads=2, n_layers=2, mlp_hidden_size=32, vocab_size=126464,
                   embedding_size=126464, mask_token_id=126336), "<|mdm_mask|>", 126336),
    "dream": ("Dream", "DreamModel", {"AutoConfig": "configuration_dream.DreamConfig",
                                       "AutoModel": "modeling_dream.DreamModel"},
              dict(vocab_size=152064, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, mask_token_id=151666), "<|mask|>", 151666),
    "mdlm": ("mdlm", "MDLM", {"AutoConfig": "configuration_mdlm.MDLMConfig",
                              "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
             dict(vocab_size=50258, hidden_dim=16, cond_dim=8, n_blocks=2, n_heads=2,
                  time_conditioning=True, frequency_embedding_size=32), "[MASK]", 50257),
}


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from lora_diffusion.core.backbone import resolve_backbone

    return AutoTokenizer.from_pretrained(resolve_backbone("minilm"))


def padded_tokenizer(out: Path, mask_token: str, mask_id: int):
    """MiniLM's WordPiece vocabulary, filler entries up to `mask_id`, then `mask_token` there."""
    from transformers import BertTokenizerFast

    base = _minilm_tokenizer()
    vocab = base.convert_ids_to_tokens(list(range(base.vocab_size)))
    if mask_token in vocab:  # MDLM keeps [MASK] as the last entry: the WordPiece one is renamed
        vocab[vocab.index(mask_token)] = "[unused_mask]"
    vocab += [f"[fill{i}]" for i in range(mask_id - len(vocab))] + [mask_token]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, mask_token=mask_token)
    assert tok.mask_token_id == mask_id
    return tok


def _hf_model(family: str, tok):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    common = dict(vocab_size=tok.vocab_size, hidden_size=WIDTH["hidden"], num_hidden_layers=WIDTH["layers"],
                  num_attention_heads=WIDTH["heads"], intermediate_size=WIDTH["ffn"], pad_token_id=tok.pad_token_id)
    if family == "bert":
        return BertForMaskedLM(BertConfig(max_position_embeddings=128, **common))
    if family == "roberta":
        return RobertaForMaskedLM(RobertaConfig(max_position_embeddings=130, **common))
    return ModernBertForMaskedLM(ModernBertConfig(
        max_position_embeddings=128, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **common))


def _remote_model(family: str, out: Path):
    """Write the hub layout (code + config.json with auto_map), then build it by that code."""
    import transformers

    model_type, arch, auto_map, fields, _, _ = REMOTE_FAMILIES[family]
    for name in auto_map.values():
        shutil.copy(REMOTE / f"{name.split('.')[0]}.py", out)
    config = {"architectures": [arch], "auto_map": auto_map, "model_type": model_type, **fields}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    cfg = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    auto = "AutoModelForMaskedLM" if "AutoModelForMaskedLM" in auto_map else "AutoModel"
    return getattr(transformers, auto).from_config(cfg, trust_remote_code=True)


def build(family: str, out: str | Path) -> Path:
    """A random-initialised (seed 0) tiny model of `family` in directory `out`."""
    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family in REMOTE_FAMILIES:
            *_, mask_token, mask_id = REMOTE_FAMILIES[family]
            tok = padded_tokenizer(out, mask_token, mask_id)
            model = _remote_model(family, out)
        else:
            tok = _minilm_tokenizer()
            model = _hf_model(family, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
