"""Budget matching: solve each method's size knob so that its trainable parameters meet a target.

Counts come from building the method on (a copy of) the backbone and calling
`accounting.account`, the single source of truth for what is trained and saved, so the matched
size is exactly what a run will report. Building is cheap (no forward pass).
"""

from __future__ import annotations

import copy

from ..core import config as config_lib
from ..core.accounting import account
from ..core.backbone import Backbone
from ..core.config import Config
from ..core.errors import UserError
from ..core.methods import build_method, registry

MAX_KNOB = 1 << 14


def knob_of(method: str) -> str | None:
    """The field that sets a method's size (its spec's `size_knob`), or None for methods whose
    size is fixed."""
    return registry.spec_of(method).size_knob


def count_params(config: Config, backbone: Backbone) -> int:
    """Trainable parameters of `config.method` on this backbone, as `account` reports them."""
    clone = Backbone(model=copy.deepcopy(backbone.model), tokenizer=backbone.tokenizer,
                     source=backbone.source, family=backbone.family)  # methods hook into the copy
    return account(build_method(config, clone))["trainable_params"]


def with_knob(config: Config, value: int) -> Config:
    spec = registry.spec_of(config.method)
    flat = config.flat()
    sets = {spec.size_knob: value}
    for name in spec.clamped_to_knob:
        sets[name] = min(flat[name], value)
    return config_lib.from_dict(config.to_dict(), sets)


def match_budget(config: Config, backbone: Backbone, target_params: int, *,
                 tolerance: float = 0.10, fixed_ok: bool = False) -> Config:
    """A copy of `config` whose method has within `tolerance` of `target_params` trainable
    parameters (the closest size the knob allows).

    Methods without a size knob (full, bitfit) raise UserError naming their fixed size, unless
    `fixed_ok`, in which case the config comes back unchanged (callers report the size as is).
    A knob that cannot reach the target within the tolerance raises UserError."""
    if target_params < 1:
        raise UserError(f"budget: target must be >= 1 trainable parameter, got {target_params}")
    method, knob = config.method, knob_of(config.method)
    if knob is None:
        if fixed_ok:
            return config
        size = count_params(config, backbone)
        raise UserError(f"budget: method {method} has no size knob; its size is fixed at "
                        f"{size} trainable parameters (target {target_params})")

    cache: dict[int, int | None] = {}

    def count(k: int) -> int | None:  # None: the knob value is invalid for this backbone
        if k not in cache:
            try:
                cache[k] = count_params(with_knob(config, k), backbone)
            except UserError:
                cache[k] = None
        return cache[k]

    # counts grow with the knob: find the first k with count >= target (exponential + bisection)
    lo, hi = 1, 1
    while True:
        c = count(hi)
        if c is None or c >= target_params or hi >= MAX_KNOB:
            break
        lo, hi = hi, hi * 2
    if count(hi) is None:  # the largest valid value lies in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(mid) is not None else (lo, mid)
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) >= target_params:
            hi = mid
        else:
            lo = mid
    candidates = [k for k in {lo, hi} if count(k) is not None]
    best = min(candidates, key=lambda k: (abs(count(k) - target_params), k))
    got = count(best)
    if abs(got - target_params) > tolerance * target_params:
        raise UserError(
            f"budget: {method} cannot reach {target_params} trainable parameters within "
            f"{tolerance:.0%}: the closest {knob}={best} gives {got}")
    return with_knob(config, best)
