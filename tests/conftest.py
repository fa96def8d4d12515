"""Shared fixtures: a tiny random BERT masked LM on disk, the real data directory, a tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    d = Path(os.environ.get("LORA_DIFFUSION_DATA_DIR", REPO.parent / "shared" / "data"))
    return d if (d / "sst2" / "train.tsv").is_file() else None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("real data not found: set LORA_DIFFUSION_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BertForMaskedLM with the MiniLM (bert-base-uncased) tokenizer."""
    from lora_diffusion.core.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_config(tiny_backbone_dir, real_data_dir, tmp_path):
    """A config that trains in about a second on the tiny backbone and real SST-2 rows."""
    from lora_diffusion.core import config as config_lib

    def make(**sets):
        base = {
            "backbone": str(tiny_backbone_dir), "data_dir": str(real_data_dir),
            "max_length": 32, "max_train_examples": 64, "max_eval_examples": 16,
            "train_accuracy_examples": 16, "output_dir": str(tmp_path / "out"),
            "train.steps": 4, "train.batch_size": 8, "train.eval_every": 2, "train.warmup_steps": 1,
            "trajectory.injection_layers": [0],
        }
        base.update(sets)
        return config_lib.from_dict({}, base)

    return make
