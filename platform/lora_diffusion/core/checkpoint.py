"""Checkpoints: the method's trainable tensors in safetensors plus the resolved config as JSON.

No pickle anywhere: a checkpoint directory holds
    method.safetensors   exactly the tensors `Method.state_to_save()` returns
    config.json          the resolved Config
    backbone.json        where the backbone came from and a fingerprint of its frozen weights
`serialize` is the single source of the saved bytes: accounting measures the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import config as config_lib
from .backbone import Backbone
from .errors import UserError

WEIGHTS = "method.safetensors"
TRAINING_STATE = "method_train.safetensors"  # resume checkpoints only


def serialize(method) -> bytes:
    tensors = {k: v.cpu() for k, v in method.state_to_save().items()}
    return st_save(tensors, metadata={"method": method.name})


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(directory: str | Path, method, config, fingerprint: str, source: str) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / WEIGHTS, serialize(method))
    _write_atomic(d / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    meta = {"backbone_source": source, "backbone_fingerprint": fingerprint, "method": method.name}
    _write_atomic(d / "backbone.json", json.dumps(meta, indent=2).encode())
    return d


def read(directory: str | Path, overrides: dict | None = None):
    """(config, tensors, meta) from a checkpoint directory; `Recipe.from_checkpoint` builds on it."""
    d = Path(directory)
    for name in (WEIGHTS, "config.json", "backbone.json"):
        if not (d / name).is_file():
            raise UserError(f"checkpoint: {d / name} not found")
    config = config_lib.from_dict(json.loads((d / "config.json").read_text()), overrides)
    meta = json.loads((d / "backbone.json").read_text())
    return config, st_load((d / WEIGHTS).read_bytes()), meta


# ----------------------------------------------------------------------------- resume


def save_state(directory: Path, recipe) -> None:
    """A resume checkpoint: the saved method (so `eval --checkpoint` reads it) plus what only
    resuming needs: optimizer.pt (AdamW state, loaded weights_only), method_train.safetensors
    (trained tensors the saved file leaves out, `Method.training_state`; only if any) and
    trainer_state.json (step, train time, tokens seen)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save(directory, recipe.method, recipe.config, recipe.fingerprint, recipe.backbone.source)
    state = recipe.state_dict()
    torch.save(state["optimizer"], directory / "optimizer.pt")
    if state["method_train"]:
        save_file({k: v.detach().cpu().contiguous() for k, v in state["method_train"].items()},
                  str(directory / TRAINING_STATE))
    meta = {k: state[k] for k in ("step", "train_time", "train_tokens")}
    (directory / "trainer_state.json").write_text(json.dumps(meta))


def load_state(directory: Path, recipe) -> None:
    """Restore a `Recipe` from `save_state`'s files: method, optimizer, counters."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / "method.safetensors"), device=str(recipe.device))
    optimizer = torch.load(directory / "optimizer.pt", map_location=recipe.device, weights_only=True)
    meta = json.loads((directory / "trainer_state.json").read_text())
    train_path = directory / TRAINING_STATE
    method_train = load_file(str(train_path), device=str(recipe.device)) if train_path.exists() else {}
    recipe.load_state_dict({"method": tensors, "method_train": method_train, "optimizer": optimizer, **meta})
