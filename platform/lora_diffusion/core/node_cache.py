"""A trial's set-up paid once per node: results of pure functions of local files, kept in the
node-local cache directory ($LORA_DIFFUSION_CACHE, else ~/.cache/lora-diffusion).

Every sweep trial is a fresh Ray Train worker process, so an in-process cache would be paid
again by each trial; this one lives on disk:

    file_digest      sha256 of a file, stored beside its (path, size, mtime_ns, inode): an
                     unchanged file is hashed once per node, a changed one (any of the four
                     differs) again
    cached           a value computed from files, stored under a key built from their digests
                     (and the digests of the code that computes it), so an edit of either
                     recomputes it
    loaded_fingerprint  `backbone_fingerprint` of a backbone just loaded from a local
                     directory, stored under its files' digests, the seed of its missing parts
                     and the library versions: the same 16 hex digits the full hash gives

Entries are written atomically (a temporary file, then a rename), so concurrent trials on one
node may race to write one but never read a torn one. A cache that cannot be written (read-only
home) is not an error: the value is computed as without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

from .backbone import Backbone, backbone_fingerprint

CACHE_ENV = "LORA_DIFFUSION_CACHE"
_CODE = Path(__file__).parent


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-diffusion")


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; from the stored digest while (size, mtime_ns, inode) hold."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    entry = cache_dir() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        stored = json.loads(entry.read_text())
        if stored["path"] == str(path) and stored["stamp"] == stamp:
            return stored["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _hash_file(path)
    _write(entry, json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}).encode())
    return digest


def code_digest(*modules: str) -> list[str]:
    """Digests of this package's core modules (file names): a cached value is the code's too."""
    return [file_digest(_CODE / m) for m in modules]


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached(kind: str, key: str, compute: Callable[[], object]):
    """`compute()`, or the value stored for (kind, key) by an earlier call on this node."""
    entry = cache_dir() / kind / f"{key}.pkl"
    try:
        with open(entry, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        pass
    value = compute()
    _write(entry, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return value


def _write(entry: Path, data: bytes) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, entry)
    except OSError:  # a read-only cache: computed each time, as without one
        pass


def weight_files(source: str | Path) -> list[Path]:
    """Every file a model directory holds (weights, config, remote code), hidden ones aside."""
    root = Path(source)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def loaded_fingerprint(backbone: Backbone, seed: int) -> str:
    """`backbone_fingerprint` of a backbone `load_backbone` has just returned, loaded after
    `torch.manual_seed(seed)` (parts its files lack, an encoder's MLM head, come from that
    seed). Stored per node under the digests of its directory's files, the seed, its family,
    dtype and the torch / transformers versions; a hub id (no directory) is hashed each time."""
    root = Path(backbone.source)
    if not root.is_dir():
        return backbone_fingerprint(backbone)
    import torch
    import transformers

    files = [(str(p.relative_to(root)), file_digest(p)) for p in weight_files(root)]
    dtype = str(next(backbone.model.parameters()).dtype)
    key = key_of(files, seed, backbone.family.name, dtype, torch.__version__, transformers.__version__,
                 code_digest("backbone.py", "families.py"))
    return cached("fingerprints", key, lambda: backbone_fingerprint(backbone))
