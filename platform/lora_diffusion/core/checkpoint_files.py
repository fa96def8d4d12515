"""The files of a checkpoint directory, read and written without the Config.

    method.safetensors   exactly the tensors `Method.state_to_save()` returns
    config.json          the resolved Config, as a plain mapping here
    backbone.json        where the backbone came from and a fingerprint of its frozen weights
`serialize` is the single source of the saved bytes: accounting measures the same bytes.
Apart from checkpoint.py (which turns config.json into a Config) so that methods that read
trained checkpoints (the router) need nothing above them: config builds its sections from the
methods.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load as st_load, save as st_save

from .errors import UserError

WEIGHTS = "method.safetensors"
CONFIG = "config.json"
BACKBONE = "backbone.json"
TRAINING_STATE = "method_train.safetensors"  # resume checkpoints only


def serialize(method) -> bytes:
    tensors = {k: v.cpu() for k, v in method.state_to_save().items()}
    return st_save(tensors, metadata={"method": method.name})


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_files(directory: str | Path) -> tuple[dict, dict, dict]:
    """(config mapping, tensors, backbone meta) of a checkpoint directory."""
    d = Path(directory)
    for name in (WEIGHTS, CONFIG, BACKBONE):
        if not (d / name).is_file():
            raise UserError(f"checkpoint: {d / name} not found")
    data, meta = _read_json(d / CONFIG), _read_json(d / BACKBONE)
    try:
        tensors = st_load((d / WEIGHTS).read_bytes())
    except Exception as exc:  # safetensors raises its own SafetensorError on truncated/foreign bytes
        raise UserError(f"checkpoint: {d / WEIGHTS} is not a safetensors file ({exc})".splitlines()[0]) from None
    return data, tensors, meta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint: {path} is not JSON ({exc})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint: {path} must hold a JSON object")
    return data
