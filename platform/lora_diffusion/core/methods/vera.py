"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454) through PEFT: W' = W + Lambda_b B Lambda_d A.

A [r, in] and B [out, r] are random, frozen and shared by every adapted layer; each layer trains
only the two scaling vectors d [r] (init `d_initial`) and b [out] (init zero, so the output is
unchanged at initialisation). PEFT's `VeraModel` is attached in place (lora.py's `attach_peft`).

The shared projections are neither counted nor saved: they are frozen and regenerated from
`projection_prng_key`, which is `train.seed` (in the checkpoint's config), exactly as PEFT does
with `save_projection=False`. A checkpoint therefore holds d and b only, and reloading
regenerates the same A and B (the checks in tests/test_methods_matrix.py reload bit-identically).

Size. The count is r + out per adapted layer, dominated by `out`: 9,216 of it on MiniLM's 24
attention projections is fixed, and reaching the comparison's 73,728 would take r = 2,688, a
projection seven times the hidden size in every layer (many times each layer's own FLOPs). So
VeRA has no size knob here: it runs at PEFT's default r = 256 (the paper's GLUE settings use
256 to 1024) and reports its size, as full fine-tuning and BitFit do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backbone import Backbone
from ..errors import check, check_one_of
from .lora import TARGETS, PeftMethod, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class VeraConfig:
    """VeRA through PEFT: shared frozen random A, B; trained scaling vectors d, b per layer."""

    rank: int = 256  # width of the shared projections (frozen: not counted)
    d_initial: float = 0.1  # initial value of d (the paper's Table 6c recommends <= 0.1)
    targets: str = "attention"  # attention | attention_mlp


def validate(vc: VeraConfig) -> None:
    check(vc.rank >= 1, "vera.rank", f"must be >= 1, got {vc.rank}")
    check(vc.d_initial > 0, "vera.d_initial", "must be > 0")
    check_one_of(vc.targets, TARGETS, "vera.targets")


class VeraMethod(PeftMethod):
    name = "vera"
    trainable_marker = "vera_lambda_"

    def build_peft_config(self, config: Config, backbone: Backbone):
        from peft import VeraConfig as PeftVeraConfig

        vc = config.vera
        target_linears(backbone, vc.targets, "vera.targets")
        with warnings.catch_warnings():  # PEFT warns about save_projection=False: chosen, see above
            warnings.simplefilter("ignore", UserWarning)
            return PeftVeraConfig(r=vc.rank, d_initial=vc.d_initial,
                                  target_modules=backbone.family.target_pattern(vc.targets),
                                  projection_prng_key=config.train.seed, save_projection=False,
                                  vera_dropout=0.0, bias="none")


# Rates: single-seed calibration (as dora.py): 3e-3 0.51, 1e-2 0.565, 3e-2 0.80 dev.
SPEC = MethodSpec(name="vera", method=VeraMethod, order=12, section=VeraConfig, validate=validate,
                  lr_grid=(1e-2, 3e-2),
                  tuning={"vera.targets": ("attention", "attention_mlp"), "vera.rank": (256, 512)})
