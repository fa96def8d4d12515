"""A trial's set-up paid once per node (core/node_cache.py): an unchanged file is not hashed again,
a changed one is; a stored split cut, overlap and fingerprint are what computing them gives."""

import os

import pytest
import torch

from lora_diffusion.core import node_cache, overlap, tasks
from lora_diffusion.core.backbone import backbone_fingerprint, load_backbone
from lora_diffusion.core.recipe import Recipe


@pytest.fixture
def node_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "node"))
    tasks._cut.cache_clear()  # the in-process copy would hide the node's
    yield tmp_path / "node"
    tasks._cut.cache_clear()


@pytest.fixture
def hashed(monkeypatch):
    """The paths node_cache hashes, in order."""
    calls = []
    real = node_cache._hash_file
    monkeypatch.setattr(node_cache, "_hash_file", lambda p: calls.append(p) or real(p))
    return calls


def test_an_unchanged_file_is_hashed_once_and_a_changed_one_again(node_dir, hashed, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    first = node_cache.file_digest(f)
    assert node_cache.file_digest(f) == first and len(hashed) == 1
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    assert node_cache.file_digest(f) == first and len(hashed) == 2
    f.write_bytes(b"b" * 1000)  # same size, new bytes (and mtime)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    assert node_cache.file_digest(f) != first and len(hashed) == 3


def test_a_replaced_file_with_the_same_size_and_mtime_is_hashed_again(node_dir, hashed, tmp_path):
    """A new inode (an atomic replace, a copied-over model) is a new file."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    first = node_cache.file_digest(f)
    new = tmp_path / "new.bin"
    new.write_bytes(b"c" * 100)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    assert node_cache.file_digest(f) != first and len(hashed) == 2


def test_a_stored_fingerprint_is_the_full_hash_and_the_same_weights(node_dir, hashed, tiny_backbone_dir):
    def load():
        torch.manual_seed(0)
        return load_backbone(str(tiny_backbone_dir))

    a, b = load(), load()
    stored = node_cache.loaded_fingerprint(a, 0)
    files = len(hashed)
    assert files and stored == backbone_fingerprint(a)
    assert node_cache.loaded_fingerprint(b, 0) == stored and len(hashed) == files  # nothing hashed
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_another_seed_of_the_missing_parts_is_not_the_stored_fingerprint(node_dir, tiny_backbone_dir,
                                                                         monkeypatch):
    torch.manual_seed(0)
    a = load_backbone(str(tiny_backbone_dir))
    node_cache.loaded_fingerprint(a, 0)
    calls = []
    real = node_cache.backbone_fingerprint
    monkeypatch.setattr(node_cache, "backbone_fingerprint", lambda bb: calls.append(1) or real(bb))
    node_cache.loaded_fingerprint(a, 0)
    assert calls == []
    node_cache.loaded_fingerprint(a, 1)
    assert calls == [1]


def test_a_recipe_on_a_warm_node_has_the_rows_overlaps_and_fingerprint_of_a_cold_one(
        node_dir, hashed, tiny_config):
    cold = Recipe(tiny_config())
    tasks._cut.cache_clear()
    hashed.clear()
    warm = Recipe(tiny_config())
    assert not hashed  # every digest came from the node's store
    for split in ("train_examples", "validation_examples", "test_examples"):
        assert getattr(warm, split) == getattr(cold, split)
    assert warm.overlap == cold.overlap and warm.fingerprint == cold.fingerprint
    assert cold.fingerprint == backbone_fingerprint(Recipe(tiny_config(), backbone=cold.backbone).backbone)


def test_a_stored_overlap_still_refuses_an_overlapping_set(node_dir):
    train = [f"phrase number {i}" for i in range(50)]
    rows = [tasks.Example(id=f"x/{i}", prompt="", response="", label=0, text=f"phrase number {i}")
            for i in range(10)]
    sets = (("test", "test_file x.tsv", rows),)
    assert overlap.check_overlaps(sets, train, allow=True) == {"test": 1.0}
    with pytest.raises(overlap.UserError, match="test_file x.tsv: 100.0%"):
        overlap.check_overlaps(sets, train, allow=False)
