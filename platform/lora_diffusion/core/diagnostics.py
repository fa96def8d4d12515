"""Where along the trajectory a method's capacity goes: the bound per bin of t, and the gain of
each phase module.

Per-t bound. t in (0, 1] is cut into `diagnostics.per_t_bins` equal bins; bin k covers
(k/n, (k+1)/n] and is scored at its midpoint (one t per bin: the bins are narrow, and one mask
draw per row and bin is what the row cap buys). The figure at a t is the loss bound in nats per
response token, -sum of `diffusion.score_candidates` at that t alone / response tokens: the
1/t-weighted cross-entropy on the masked response, the ELBO's integrand (core/prepare_eval.py
reports exp of it); the mean over the bins is the midpoint-rule ELBO. Method and backbone (the
method switched off, `Method.switched_off`) see the same masks (one seeded generator per bin), so
their difference is the method's, not the draws'. The backbone's figures depend on no trained
tensor: computed once per run and split, then repeated. Metrics `<split>/per_t/bound_bin{k}`
and `<split>/per_t/backbone_bound_bin{k}`, k = 0 at low t (few masks) to n-1 at t near 1.

Phase gains (K > 1 phase modules, `Method.phase_modules`): at the final evaluation, the split's
metric with all modules minus the metric with phase k's module switched off, the others kept;
positive: the module helps. Classification: ELBO accuracy (the task's metric, t stratified over
the phases as in evaluation). Generation: the ELBO on the reference, nats per token, as
`off - all` (a bound: lower is better), not ROUGE / F1 of generated text, which would cost K
more sampler runs of `sampler_steps` forwards per batch; the same masks as `elbo_nats_per_token`.
The bound is a sum over t and a phase module acts only at its own t, so two passes (all on, all
phase modules off) give every phase's gain (measured, grid_xquad_sharing's per_step cell, K = 16:
the K passes made a 14-minute run 40 minutes long on 2 cores; two passes take about 4 minutes),
and the all-on pass is the test evaluation's own (Recipe.reference_elbo_terms): one more pass.
"""

from __future__ import annotations

import torch

from . import diffusion, evaluation, generation, tasks
from .diffusion import seeded

PER_T_SEED = 19  # the per-t masks: seeded(train.seed, PER_T_SEED, bin)
AUTO_PER_T_BINS = 10  # diagnostics.per_t_bins None: at the final evaluation of a result run


def per_t_bins(config, final: bool) -> int:
    """The bins of this evaluation: the number set, at every evaluation; unset (None), 10 at the
    final evaluation of a result run and none otherwise (evaluation.role: a search trial's
    figures serve selection, which reads validation's metric only)."""
    n = config.diagnostics.per_t_bins
    if n is not None:
        return n
    return AUTO_PER_T_BINS if final and config.evaluation.role == "result" else 0


def phase_gains_on(config) -> bool:
    """diagnostics.phase_gains as set, or (None) on in a result run only."""
    on = config.diagnostics.phase_gains
    return config.evaluation.role == "result" if on is None else on


def bin_edges(n: int) -> list[tuple[float, float]]:
    """The n equal bins of t over (0, 1], low t first."""
    return [(k / n, (k + 1) / n) for k in range(n)]


def bin_times(n: int, t_min: float) -> list[float]:
    """Each bin's midpoint (at least t_min, where the 1/t weight is bounded)."""
    return [max(0.5 * (lo + hi), t_min) for lo, hi in bin_edges(n)]


@torch.no_grad()
def bound_by_bin(recipe, examples, n_bins: int) -> list[float]:
    """Nats per response token at each bin's midpoint t: -(ELBO integrand), masks seeded per bin."""
    c, mask_id = recipe.config, recipe.backbone.mask_token_id
    batch_size = c.evaluation.batch_size
    recipe.method.eval()
    batches = [recipe.encode(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    tokens = sum(int(b.response_mask.sum()) for b in batches)
    out = []
    for k, t in enumerate(bin_times(n_bins, c.diffusion.t_min)):
        gen = seeded(c.train.seed, PER_T_SEED, k)
        total = sum(float(diffusion.score_candidates(recipe.denoiser(b), b, mask_id, c.diffusion.noise_schedule,
                                                     [(t, 1.0)], gen).sum()) for b in batches)
        out.append(-total / max(tokens, 1))
    return out


class Diagnostics:
    """The recipe's diagnostics, with their caches: the backbone's per-t figures per split, and
    the method's per split at its last state (the final result repeats the last periodic one)."""

    def __init__(self, recipe):
        self.recipe, self.settings = recipe, recipe.config.diagnostics
        if per_t_bins(recipe.config, final=True):
            recipe.method.remember_start()  # the method as built is the backbone: switched_off
        self._backbone: dict[tuple, list[float]] = {}  # rows -> figures
        self._method: dict[str, tuple] = {}  # split -> (Recipe.state_key, metrics)

    def per_t(self, examples, split: str, final: bool = True) -> dict[str, float]:
        """`<split>/per_t/bound_bin{k}` and `backbone_bound_bin{k}` on the first `per_t_rows`
        rows; {} when this evaluation (`final`: the run's last) has no bins (`per_t_bins`)."""
        n = per_t_bins(self.recipe.config, final)
        if not n:
            return {}
        rows = examples[:self.settings.per_t_rows]
        key = self.recipe.state_key(rows)
        if self._method.get(split, (None,))[0] == key:
            return dict(self._method[split][1])
        ids = tuple(e.id for e in rows)
        if ids not in self._backbone:
            with self.recipe.method.switched_off():
                self._backbone[ids] = bound_by_bin(self.recipe, rows, n)
        out = {f"{split}/per_t/bound_bin{k}": v for k, v in enumerate(bound_by_bin(self.recipe, rows, n))}
        out.update({f"{split}/per_t/backbone_bound_bin{k}": v for k, v in enumerate(self._backbone[ids])})
        self._method[split] = (key, out)
        return dict(out)

    def phase_gains(self, examples, split: str, scored: dict) -> dict:
        """`<split>/phase_gain/{k}` per phase module (K > 1 only), from the split's metric in
        `scored` (the final result's) and the metric with phase k switched off."""
        phases = self.recipe.method.phase_modules()
        if not phase_gains_on(self.recipe.config) or len(phases) < 2:
            return {}
        if self.recipe.spec.kind != "classification":
            return {f"{split}/phase_gain_metric": "elbo_nats_per_token (off - all)",
                    **self._elbo_phase_gains(examples, split, phases)}
        out: dict = {f"{split}/phase_gain_metric": "accuracy"}
        for k in phases:
            with self.recipe.method.switched_off(phases={k}):
                off = self._metric(examples)
            out[f"{split}/phase_gain/{k}"] = scored[f"{split}/accuracy"] - off
        return out

    def _elbo_phase_gains(self, examples, split: str, phases: list[int]) -> dict:
        """Two ELBO passes, not K: phase k's module acts only on rows whose t lies in phase k, so
        with every phase module off each t's term is the term with its own phase's module off,
        and phase k's gain is the sum over phase k's points of (off - all), in nats per token.
        The masks are `elbo_nats_per_token`'s (one generator, seeded alike, in both passes); after
        the split's evaluation at this state, the all-on pass is its terms, kept by the recipe."""
        r, c = self.recipe, self.recipe.config
        r.method.eval()
        points = diffusion.stratified_points(r.method.phase_boundaries(), c.diffusion.eval_t_points,
                                             c.diffusion.t_min)
        times = [(t, w) for t, w, _ in points]

        on = r.reference_elbo_terms(examples, times)  # the split's reported ELBO's own terms
        with r.method.switched_off(phases=set(phases)):
            off = generation.reference_elbo_by_point(r, examples, times, c.evaluation.batch_size,
                                                     seeded(c.train.seed, 7))
        return {f"{split}/phase_gain/{k}": float(sum(off[i] - on[i] for i, p in enumerate(points) if p[2] == k))
                for k in phases}

    @torch.no_grad()
    def _metric(self, examples) -> float:
        """The split's ELBO accuracy (classification), drawn as Recipe.evaluate draws it."""
        r, c = self.recipe, self.recipe.config
        r.method.eval()
        times = diffusion.stratified_times(r.method.phase_boundaries(), c.diffusion.eval_t_points,
                                           c.diffusion.t_min)
        by_elbo, _ = evaluation.classify(r, examples, times, elbo=True, sampler=False,
                                         batch_size=c.evaluation.batch_size)
        return tasks.accuracy(by_elbo, examples)
