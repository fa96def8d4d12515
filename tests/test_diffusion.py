"""Masked diffusion: schedules, the conditional loss, stratified scoring, the sampler."""

import math

import pytest
import torch

from lora_diffusion.core import diffusion
from lora_diffusion.core.diffusion import Batch


def _batch(B=3, S=10, resp=(6, 8)):
    ids = torch.arange(B * S).reshape(B, S) % 40 + 1  # token ids 1..40; 0 is [MASK]
    response = torch.zeros(B, S, dtype=torch.bool)
    response[:, resp[0]:resp[1]] = True
    prompt = torch.zeros(B, S, dtype=torch.bool)
    prompt[:, 1:resp[0]] = True
    return Batch(ids, torch.ones_like(ids), response, prompt)


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_schedules_go_from_clean_to_all_masked(schedule):
    t = torch.tensor([1e-6, 0.5, 1.0])
    p = diffusion.mask_prob(t, schedule)
    assert p[0] < 1e-5 and 0 < p[1] < 1 and p[2] > 0.998
    # w(t) = p'(t)/p(t), checked by finite differences
    tt = torch.tensor([0.3], dtype=torch.float64)
    h = 1e-6
    deriv = (diffusion.mask_prob(tt + h, schedule) - diffusion.mask_prob(tt - h, schedule)) / (2 * h)
    assert torch.allclose(diffusion.elbo_weight(tt, schedule), deriv / diffusion.mask_prob(tt, schedule), rtol=1e-4)


def test_masking_touches_only_the_response():
    batch = _batch()
    noisy, masked = diffusion.apply_mask(batch, torch.ones(3), mask_id=0, schedule="linear",
                                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, batch.response_mask)  # t = 1 masks every response token
    assert torch.equal(noisy[~batch.response_mask], batch.input_ids[~batch.response_mask])


def test_loss_is_the_weighted_cross_entropy_on_masked_positions():
    batch = _batch(B=4)
    V = 1000
    seen = {}

    def denoise(ids, attn, select, t):
        seen["select"], seen["t"] = select.clone(), t.clone()
        return torch.zeros(int(select.sum()), V)  # uniform prediction: CE = log V everywhere

    loss, _ = diffusion.diffusion_loss(denoise, batch, 0, "linear", 1e-3, torch.Generator().manual_seed(0))
    sel, t = seen["select"], seen["t"]
    assert not (sel & ~batch.response_mask).any()
    assert sel.any(1).all()  # masks are drawn conditioned on at least one masked token
    factor = (1 - (1 - t) ** 2) / t  # w(t) * P(at least one of 2 masked)
    expected = sum(factor[i] * sel[i].sum() / 2 for i in range(4)) * math.log(V) / 4
    assert torch.isclose(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5)


def test_nonempty_masks_follow_the_conditional_law():
    """P(mask pattern | at least one masked) for L = 3 at t = 0.3, by Monte Carlo."""
    batch = _batch(B=20000, S=6, resp=(2, 5))
    t = torch.full((20000,), 0.3)
    _, masked = diffusion.apply_mask(batch, t, 0, "linear", torch.Generator().manual_seed(0), nonempty=True)
    m = masked[:, 2:5]
    assert m.any(1).all()
    p, norm = 0.3, 1 - 0.7 ** 3
    for pattern in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 1]):
        k = sum(pattern)
        expected = p ** k * (1 - p) ** (3 - k) / norm
        freq = (m == torch.tensor(pattern, dtype=torch.bool)).all(1).float().mean()
        assert abs(freq - expected) < 0.015, (pattern, float(freq), expected)


def test_stratified_times_cover_each_phase_and_weights_sum_to_one():
    times = diffusion.stratified_times([0, 0.25, 0.5, 1.0], points=4, t_min=1e-3)
    assert [round(t, 4) for t, _ in times] == [0.125, 0.375, 0.625, 0.875]
    assert math.isclose(sum(w for _, w in times), 1.0)
    assert len(diffusion.stratified_times([0, 0.1, 1.0], points=2, t_min=1e-3)) == 3  # every phase >= 1


def test_general_scoring_equals_the_one_token_fast_path():
    batch = _batch(resp=(6, 7))
    V = 50
    table = torch.randn(3, V, generator=torch.Generator().manual_seed(0))

    def denoise(ids, attn, select, t):  # depends on t and the row, not on the masked token
        rows = select.nonzero()[:, 0]
        return table[rows] * t[rows, None]

    times = diffusion.stratified_times([0, 0.5, 1.0], 4, 1e-3)
    labels = batch.input_ids[:, 6].tolist()
    fast = diffusion.score_label_words(denoise, batch, labels, "linear", times, mask_id=0)
    general = diffusion.score_candidates(denoise, batch, 0, "linear", times, torch.Generator().manual_seed(0))
    assert torch.allclose(fast.diagonal(), general, atol=1e-5)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampler_fills_every_masked_position_and_keeps_the_prompt(remasking):
    batch = _batch(resp=(4, 9))
    V = 30

    def denoise(ids, attn, select, t):
        assert (ids[select] == 0).all()  # only still-masked positions are asked for
        return torch.randn(int(select.sum()), V, generator=torch.Generator().manual_seed(1)) + 5

    out = diffusion.sample(denoise, batch, mask_id=0, steps=3, remasking=remasking,
                           generator=torch.Generator().manual_seed(0), schedule="linear")
    assert not (out[batch.response_mask] == 0).any()
    assert torch.equal(out[~batch.response_mask], batch.input_ids[~batch.response_mask])
    assert diffusion.transfer_counts(5, 3, "linear") == [2, 2, 1]  # LLaDA: even, remainder first
    assert diffusion.transfer_counts(1, 4, "linear") == [1, 0, 0, 0]


def _context_denoise(V=30):
    """Logits that depend on the position and on the whole input row, so the order in which tokens
    are unmasked changes what later steps see (a sampler that reorders steps differs)."""
    table = torch.randn(64, V, generator=torch.Generator().manual_seed(2))

    def denoise(ids, attn, select, t):
        rows, cols = select.nonzero().unbind(1)
        return table[cols] + 0.01 * ids.sum(1)[rows, None].float() * table[(cols + 7) % 64]
    return denoise


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_one_block_as_long_as_the_response_is_the_plain_sampler(remasking):
    batch = _batch(resp=(2, 9))
    runs = [diffusion.sample(_context_denoise(), batch, 0, 7, remasking, torch.Generator().manual_seed(0),
                             "linear", block_length=b) for b in (None, 7, 12)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_blocks_decode_left_to_right_each_with_its_share_of_the_steps():
    """5 response tokens in blocks of 2 (2, 2, then 1), 6 steps: 2 per block, one token each; the
    last block is done after one step. Only the current block is predicted and unmasked, the
    earlier ones already complete, the later ones still all masked; t is the global schedule's."""
    batch = _batch(B=2, S=9, resp=(2, 7))
    blocks = [[2, 3], [4, 5], [6]]
    seen = []
    denoise = _context_denoise()

    def spy(ids, attn, select, t):
        seen.append((ids.clone(), select.clone(), float(t[0])))
        return denoise(ids, attn, select, t)

    out = diffusion.sample(spy, batch, 0, 6, "low_confidence", torch.Generator().manual_seed(0),
                           "linear", block_length=2)
    assert [t for _, _, t in seen] == pytest.approx(diffusion.step_times(6)[:5])
    current = [0, 0, 1, 1, 2]
    for (ids, select, _), k in zip(seen, current):
        predicted = sorted(set(select.nonzero()[:, 1].tolist()))
        assert predicted == [p for p in blocks[k] if (ids[:, p] == 0).any()]
        for j, block in enumerate(blocks):
            masked = ids[:, block] == 0
            if j < k:
                assert not masked.any()
            if j > k:
                assert masked.all()
    assert [int((ids[:, 2:7] == 0).sum()) for ids, _, _ in seen] == [10, 8, 6, 4, 2]  # one a row a step
    assert not (out[batch.response_mask] == 0).any()
    with pytest.raises(ValueError, match="3 blocks"):
        diffusion.sample(spy, batch, 0, 4, "low_confidence", torch.Generator(), "linear", block_length=2)


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_sampler_steps_follow_the_noise_schedule(schedule):
    """The state the sampler tells t has about L p(t) / p(1) tokens still masked: each step's
    time and the tokens left masked at it agree under every schedule."""
    L, steps = 40, 8
    batch = _batch(B=1, S=4 + L + 2, resp=(4, 4 + L))
    told = []

    def denoise(ids, attn, select, t):
        told.append((float(t[0]), int(select.sum())))
        return torch.randn(int(select.sum()), 30, generator=torch.Generator().manual_seed(1)) + 5

    diffusion.sample(denoise, batch, mask_id=0, steps=steps, remasking="low_confidence",
                     generator=torch.Generator().manual_seed(0), schedule=schedule)
    assert [t for t, _ in told] == pytest.approx(diffusion.step_times(steps)[:steps])
    for t, masked in told:
        p = diffusion.mask_prob(torch.tensor([t, 1.0], dtype=torch.float64), schedule)
        assert abs(masked - L * float(p[0] / p[1])) <= 1, (t, masked)
    assert sum(diffusion.transfer_counts(L, steps, schedule)) == L


def test_encode_keeps_the_response_and_the_end_of_the_prompt(tiny_backbone_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    b = diffusion.encode(tok, ["one two three four five six seven eight nine ten sentiment :"],
                         [[2307]], max_length=8)
    assert b.input_ids.shape == (1, 8)
    assert b.input_ids[0, b.response_mask[0]].tolist() == [2307]
    assert tok.decode(b.input_ids[0, b.prompt_mask[0]]).endswith("sentiment :")


def test_encode_with_a_prompt_tail_cuts_the_middle_and_keeps_start_and_cue(tiny_backbone_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    prompt = "one two three four five six seven eight nine ten sentiment :"
    b = diffusion.encode(tok, [prompt], [[2307]], max_length=8, prompt_tail=2)
    kept = tok.decode(b.input_ids[0, b.prompt_mask[0]])
    assert kept == "one two three sentiment :"  # 5 of room: 3 from the start, the 2-token cue
    assert diffusion.cut_prompt([1, 2, 3], room=5, tail=2) == [1, 2, 3]  # fits: untouched
    assert diffusion.cut_prompt([1, 2, 3, 4, 5, 6], room=4, tail=None) == [3, 4, 5, 6]
    assert diffusion.cut_prompt([1, 2, 3, 4, 5, 6], room=4, tail=9) == [3, 4, 5, 6]
