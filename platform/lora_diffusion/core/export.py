"""A checkpoint taken out of the platform: a PEFT adapter, merged Hugging Face weights, or native.

    peft    adapter_config.json + adapter_model.safetensors, as PEFT's own `save_pretrained`
            writes them: `PeftModel.from_pretrained(backbone, OUT)` loads it without this package.
            For the methods that are PEFT tuners (lora, dora, adalora, vera, gelora: LoRA with a
            rank_pattern). The platform injects PEFT in place, without a PeftModel wrapper, so the
            tensor names are PEFT's `get_peft_model_state_dict` of the tuner with PeftModel's
            `base_model.` in front. A backbone whose stored files lack weights the platform gave it
            at load (an encoder's seeded MLM head) is written beside it, in `base_model/`.
    merged  the backbone with the update folded in (PEFT's merge_and_unload; full fine-tuning and
            BitFit change the weights themselves), `save_pretrained` with its tokenizer and, for
            remote-code families, their code files: the family's Auto class loads it alone.
    native  the platform's checkpoint files (and a router's experts) for `lora_diffusion.load`
            (core/loader.py): the methods whose update depends on t (trajectory modules, T-LoRA,
            NaRA, continuous t, the router) or sits outside the weights (adapters, prefixes).

Every export writes `export.json` (method, format, backbone, how the family's forward is called)
into a temporary directory beside OUT, renamed to OUT only when complete. A format the method
does not have is one UserError naming the method and its formats, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import families
from .checkpoint_files import BACKBONE, CONFIG, WEIGHTS, read_files
from .errors import UserError

FORMATS = ("peft", "merged", "native")
PEFT_METHODS = ("lora", "dora", "adalora", "vera", "gelora")  # PEFT tuners (core/methods/lora.py)
MERGEABLE = (*PEFT_METHODS, "full", "bitfit")  # the update is a change of the backbone's weights
EXPORT_FILE = "export.json"
BASE_MODEL_DIR = "base_model"


def formats_of(method: str) -> tuple[str, ...]:
    """The formats a method exports to."""
    if method in PEFT_METHODS:
        return FORMATS
    return ("merged", "native") if method in MERGEABLE else ("native",)


def method_of(directory: str | Path) -> str:
    """The method a checkpoint holds (backbone.json), read without loading anything."""
    config, _, meta = read_files(directory)
    return str(meta.get("method") or config.get("method"))


def check_format(method: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt not in formats_of(method):
        raise UserError(f"--format {fmt}: method {method} has no {fmt} export; its formats: "
                        f"{', '.join(formats_of(method))}")


def export(checkpoint: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write `checkpoint` as `fmt` to `out`; returns `out`. Refusals come before anything is
    written; `out` appears complete or not at all."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_format(method_of(checkpoint), fmt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = {"native": write_native, "peft": write_peft, "merged": write_merged}[fmt](checkpoint, tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _info(fmt: str, config: dict, meta: dict, family: families.BackboneFamily) -> dict:
    """export.json: what the export is and how its family's forward is called (the MLflow
    wrapper, engine/pyfunc_merged.py, reads it instead of importing this package)."""
    return {"format": fmt, "method": meta.get("method"), "backbone": config.get("backbone"),
            "backbone_fingerprint": meta.get("backbone_fingerprint"), "family": family.name,
            "auto_class": family.auto_class, "trust_remote_code": family.remote_code,
            "attention_mask": family.attention_mask, "time_argument": family.time_argument,
            "time_as_sigma": family.time_as_sigma, "shifted": family.shifted,
            "formats": list(formats_of(str(meta.get("method"))))}


# ----------------------------------------------------------------------------- native


def write_native(checkpoint: Path, out: Path) -> dict:
    """The checkpoint's three files; a router's experts copied into experts/K and named relative
    to the export (core/loader.py reads them there)."""
    config, _, meta = read_files(checkpoint)
    for name in (WEIGHTS, BACKBONE):
        shutil.copy2(checkpoint / name, out / name)
    experts = (config.get("router") or {}).get("checkpoints") or []
    if config.get("method") == "router" and experts:
        for k, path in enumerate(experts):
            shutil.copytree(Path(path) if Path(path).is_absolute() else checkpoint / path, out / "experts" / str(k))
        config["router"]["checkpoints"] = [f"experts/{k}" for k in range(len(experts))]
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    (out / "README.md").write_text(
        f"# {meta.get('method')} checkpoint (lora-diffusion native format)\n\n"
        "    import lora_diffusion\n    model = lora_diffusion.load(THIS_DIRECTORY)\n"
        "    logits = model.logits(input_ids, attention_mask, t)   # the method told t\n"
        "    texts = model.generate(prompts)                       # the reverse sampler\n\n"
        f"The backbone is `{config.get('backbone')}` (backbone.json: its fingerprint).\n")
    return _info("native", config, meta, families.FAMILIES[_family_name(checkpoint)])


def _family_name(checkpoint: Path) -> str:
    config = read_files(checkpoint)[0]
    requested = config.get("backbone_family", families.AUTO)
    if requested != families.AUTO:
        return requested
    from .backbone import resolve_backbone

    return families.detect(families.read_model_config(resolve_backbone(config["backbone"]), True)).name


# ----------------------------------------------------------------------------- peft


def write_peft(checkpoint: Path, out: Path) -> dict:
    """PEFT's adapter files from the loaded method's tuner."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .loader import load

    model = load(checkpoint)
    tuner = model.method.tuner
    state = get_peft_model_state_dict(tuner, adapter_name="default")
    state = {f"base_model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = tuner.peft_config["default"]
    peft_config.inference_mode = True
    peft_config.base_model_name_or_path = model.backbone.source
    if _weights_not_stored(model.backbone):
        tuner.unload()  # the backbone as loaded, without the injected layers (their state is saved above)
        _save_backbone(model.backbone, out / BASE_MODEL_DIR, dtype=None)
        peft_config.base_model_name_or_path = BASE_MODEL_DIR
    peft_config.save_pretrained(str(out))
    config, _, meta = read_files(checkpoint)
    return {**_info("peft", config, meta, model.backbone.family),
            "base_model": peft_config.base_model_name_or_path}


def _weights_not_stored(backbone) -> bool:
    """Whether loading the backbone's directory with transformers alone leaves weights to chance
    (MiniLM has no MLM head: the platform seeds one). Loaded again, on the meta device."""
    import transformers
    from transformers.utils import logging as hf_logging

    family = backbone.family
    if not Path(backbone.source).is_dir():
        return False
    cls = getattr(transformers, family.auto_class)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the missing keys we ask for
    try:
        _, info = cls.from_pretrained(backbone.source, output_loading_info=True, device_map="meta",
                                      trust_remote_code=family.remote_code, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return bool(info.get("missing_keys"))


# ----------------------------------------------------------------------------- merged


def write_merged(checkpoint: Path, out: Path) -> dict:
    """The backbone with the method's update in its weights, saved as its family saves it."""
    from .loader import load

    model = load(checkpoint)
    method = model.method
    if hasattr(method, "tuner"):  # a PEFT tuner: its layers merged into the linears they wrap
        method.tuner.merge_and_unload()
    config, _, meta = read_files(checkpoint)
    stored = families.read_model_config(model.backbone.source, True) if Path(model.backbone.source).is_dir() else {}
    _save_backbone(model.backbone, out, dtype=stored.get("dtype") or stored.get("torch_dtype"))
    return _info("merged", config, meta, model.backbone.family)


def _save_backbone(backbone, out: Path, dtype: str | None) -> None:
    """`save_pretrained` of the model (in its stored dtype) and tokenizer; a remote-code family's
    code files copied from its directory where transformers did not write them."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per shard written, on stderr
    model = backbone.model
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    backbone.tokenizer.save_pretrained(str(out))
    source = Path(backbone.source)
    if backbone.family.remote_code and source.is_dir():
        for code in source.glob("*.py"):
            if not (out / code.name).exists():
                shutil.copy2(code, out / code.name)
