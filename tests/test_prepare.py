"""prepare-backbone: diffusion-objective training of the head (or all), saved as an HF directory."""

import json

import torch

from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.prepare import prepare_backbone


def test_head_only_preparation_trains_only_the_head_and_saves_a_loadable_model(
        tiny_backbone_dir, synthetic_data_dir, tmp_path):
    before = load_backbone(str(tiny_backbone_dir)).model.state_dict()
    result = prepare_backbone(str(tmp_path / "prep"), mode="head", steps=3, batch_size=4,
                              backbone_name=str(tiny_backbone_dir), data_dir=str(synthetic_data_dir),
                              eval_texts=8, log=None, lr=1e-2)
    after = load_backbone(str(tmp_path / "prep")).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("cls.") for k in changed)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in changed
    saved = json.loads((tmp_path / "prep" / "prepare_result.json").read_text())
    assert saved["heldout_note"].startswith("validation splits")
    for key in ("0.15", "0.5"):
        assert 0 <= saved["heldout_masked_token_accuracy_after"][key] <= 1
    assert result["mode"] == "head"


def test_preparation_refuses_to_overwrite(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    import pytest

    from lora_diffusion.core.errors import UserError

    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "x").write_text("keep me")
    with pytest.raises(UserError, match="out:"):
        prepare_backbone(str(tmp_path / "prep"), steps=1, backbone_name=str(tiny_backbone_dir),
                         data_dir=str(synthetic_data_dir), log=None)


def test_long_texts_are_cut_to_fit(tiny_backbone_dir):
    from transformers import AutoTokenizer

    from lora_diffusion.core.prepare import _encode_text

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    batch = _encode_text(tok, ["word " * 200, "short text"], max_length=64)
    assert batch.input_ids.shape == (2, 63)  # [CLS] + 61 + [SEP]
    assert int(batch.response_mask[0].sum()) == 61
