"""Checkpoints: the method's trainable tensors in safetensors plus the resolved config as JSON.

No pickle anywhere; the files and their bytes are checkpoint_files.py's. Here: saving a method
with its Config, reading one back as a Config, and the resume format (save_state/load_state).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import config as config_lib, sharding
from .checkpoint_files import BACKBONE, CONFIG, TRAINING_STATE, WEIGHTS, read_files, serialize, write_atomic
from .errors import UserError


def save(directory: str | Path, method, config, fingerprint: str, source: str) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / WEIGHTS, serialize(method))
    resolved = config_lib.from_dict(config.to_dict(), method.saved_settings())  # e.g. GeLoRA's dims
    write_atomic(d / CONFIG, json.dumps(resolved.to_dict(), indent=2).encode())
    meta = {"backbone_source": source, "backbone_fingerprint": fingerprint, "method": method.name}
    write_atomic(d / BACKBONE, json.dumps(meta, indent=2).encode())
    return d


def read(directory: str | Path, overrides: dict | None = None):
    """(config, tensors, meta) from a checkpoint directory; `Recipe.from_checkpoint` builds on it."""
    data, tensors, meta = read_files(directory)
    try:
        config = config_lib.from_dict(data, overrides)
    except UserError as exc:  # a foreign or older config.json (or a bad --set on it): name the file
        raise UserError(f"checkpoint {Path(directory) / CONFIG} (with --set): {exc}" if overrides
                        else f"checkpoint {Path(directory) / CONFIG}: {exc}") from None
    return config, tensors, meta


# ----------------------------------------------------------------------------- resume


def save_state(directory: Path, recipe) -> None:
    """A resume checkpoint: the saved method (so `eval --checkpoint` reads it) plus what only
    resuming needs: optimizer.pt (AdamW state, loaded weights_only), method_train.safetensors
    (trained tensors the saved file leaves out, `Method.training_state`; only if any) and
    trainer_state.json (step, train time, tokens seen). A sharded recipe (FSDP2) is saved by
    every rank: `_save_sharded`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if getattr(recipe, "sharded", False):
        _save_sharded(directory, recipe)
        return
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
    if sharding.is_sharded_checkpoint(directory):
        _load_sharded(directory, recipe)
        return
    tensors = load_file(str(directory / WEIGHTS), device=str(recipe.device))
    optimizer = torch.load(directory / "optimizer.pt", map_location=recipe.device, weights_only=True)
    meta = json.loads((directory / "trainer_state.json").read_text())
    train_path = directory / TRAINING_STATE
    method_train = load_file(str(train_path), device=str(recipe.device)) if train_path.exists() else {}
    recipe.load_state_dict({"method": tensors, "method_train": method_train, "optimizer": optimizer, **meta})


def _counters(recipe) -> dict:
    return {"step": recipe.step, "train_time": recipe.train_time, "train_tokens": recipe.train_tokens}


def _save_sharded(directory: Path, recipe) -> None:
    """Collective: each rank's shard of the trained parameters and AdamW state through
    torch.distributed.checkpoint (core/sharding.py); rank 0 adds the config, the backbone's
    fingerprint and trainer_state.json. Not readable by `eval --checkpoint` as is: consolidate
    it first (torch.distributed.checkpoint.format_utils.dcp_to_torch_save)."""
    directory.mkdir(parents=True, exist_ok=True)
    sharding.save_sharded(directory, recipe.method, recipe.optimizer)
    if recipe.rank == 0:
        write_atomic(directory / CONFIG, json.dumps(recipe.config.to_dict(), indent=2).encode())
        meta = {"backbone_source": recipe.backbone.source, "backbone_fingerprint": recipe.fingerprint,
                "method": recipe.method.name, "sharded": True}
        write_atomic(directory / BACKBONE, json.dumps(meta, indent=2).encode())
        (directory / "trainer_state.json").write_text(json.dumps(_counters(recipe)))


def _load_sharded(directory: Path, recipe) -> None:
    """Collective: `_save_sharded`'s state resharded onto this recipe's ranks, counters restored."""
    sharding.load_sharded(directory, recipe.method, recipe.optimizer)
    meta = json.loads((directory / "trainer_state.json").read_text())
    recipe.step, recipe.train_time, recipe.train_tokens = meta["step"], meta["train_time"], meta["train_tokens"]
    recipe.method.after_step(recipe.step)
