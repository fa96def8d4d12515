"""What the benchmark runs on: its sizes (smoke, small, full), the backbone loaded once and copied
per variant, recipes built through the config exactly as `lora-diffusion train` builds them, and
batches of an exact shape.

Every variant gets its own copy of the backbone: methods attach to the model (hooks, PEFT layers
in place), so variants that must stay alive side by side for interleaved timing cannot share one.
Batches come from made-up SST-2 rows whose prompt is long enough to fill `max_length`: the
recipe's own `encode` cuts it to exactly the sequence length asked for (real SST-2 phrases are
short, so a length sweep on them would measure padding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ...core import config as config_lib
from ...core.backbone import load_backbone
from ...core.task_specs import Example


@dataclass(frozen=True)
class BenchSize:
    backbone: str
    train_shapes: tuple[tuple[int, int], ...]  # (batch, sequence): every training variant
    growth_shapes: tuple[tuple[int, int], ...]  # (batch, sequence): the GROWTH_VARIANTS only
    memory_shapes: tuple[tuple[int, int], ...]  # (batch, sequence) measured per variant in a subprocess
    growth_shape: tuple[int, int]  # (batch, sequence) of the K / layers growth curves
    infer_shape: tuple[int, int]  # (batch, sequence) of one denoising step
    gen_steps: tuple[int, ...]  # T of whole generations (the response has max(T) tokens)
    gen_batch: int
    phases: tuple[int, ...] = (1, 2, 4, 8)
    modules: tuple[int, ...] = (2, 4, 8)  # router compositions (the router needs >= 2)
    repeats: int = 3
    step_repeats: int = 3  # rounds of the one-step inference timing (cheap: more beat the noise)
    memory_variants: tuple[str, ...] | None = None  # None: every training variant
    threads: int = 1
    # the scaling section (scaling.py): Ray Train runs of (workers, torch threads per worker)
    # at one global (batch, sequence), warm-up steps then measured steps, `scaling_rounds` of them
    scaling_runs: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1))
    scaling_shape: tuple[int, int] = (32, 64)
    scaling_steps: tuple[int, int] = (5, 30)
    scaling_rounds: int = 1


SIZES = {
    # seconds: the tiny random model, every variant and section at toy shapes (the CI test)
    "smoke": BenchSize(backbone="tiny-random", train_shapes=((4, 32),), growth_shapes=((4, 16),),
                       memory_shapes=((4, 32),),
                       growth_shape=(2, 16), infer_shape=(2, 32), gen_steps=(2, 4), gen_batch=1,
                       phases=(1, 2, 4), modules=(2, 4), repeats=2,
                       memory_variants=("trajectory-mid", "lora-attn"),
                       scaling_shape=(4, 16), scaling_steps=(2, 4)),
    # the committed run on a shared 2-core CPU: fewer shapes, memory of the main variants only
    "small": BenchSize(backbone="minilm", train_shapes=((8, 64),),
                       growth_shapes=((8, 32), (8, 128), (1, 64), (16, 64)),
                       memory_shapes=((32, 128),), growth_shape=(8, 64), infer_shape=(8, 128),
                       gen_steps=(8, 32), gen_batch=1, repeats=3, step_repeats=9,
                       memory_variants=("floor (no-grad forward)", "trajectory-mid", "trajectory-every",
                                        "lora-attn", "adapter", "full"), scaling_rounds=2),
    # the grid, for a machine with the cores (or a GPU) for it
    "full": BenchSize(backbone="minilm", train_shapes=tuple((b, s) for b in (1, 8, 32, 64)
                                                            for s in (32, 64, 128, 256, 512)), growth_shapes=(),
                      memory_shapes=((32, 128), (64, 512)), growth_shape=(32, 128), infer_shape=(32, 128),
                      gen_steps=(8, 32, 128), gen_batch=8, repeats=5,
                      scaling_runs=((1, 1), (1, 2), (2, 1), (4, 1)), scaling_shape=(32, 128),
                      scaling_steps=(5, 50), scaling_rounds=3),
}


@dataclass
class Workbench:
    """The loaded backbone and the settings every variant shares."""

    size: BenchSize
    data_dir: str | None = None
    base: dict = field(default_factory=dict)

    def __post_init__(self):
        self.base = {"task": "sst2", "backbone": self.size.backbone, "data_dir": self.data_dir,
                     "max_train_examples": 64, "max_eval_examples": 8, "train.threads": self.size.threads,
                     "train.steps": 10**6, "train.warmup_steps": 0,
                     "diagnostics.per_t_bins": 0, **self.base}  # no evaluation: no copy of the method as built
        probe = config_lib.from_dict({}, self.base)
        self.backbone = load_backbone(probe.backbone, allow_hub=probe.allow_hub)
        self.num_layers = len(self.backbone.layers)

    def recipe(self, sets: dict, copy_backbone: bool = True):
        """A Recipe of `base` overridden by `sets`, on its own copy of the backbone (or on the
        loaded one itself, for a process that builds one variant)."""
        from ...core.recipe import Recipe

        config = config_lib.from_dict({}, {**self.base, **sets})
        return Recipe(config, backbone=copy.deepcopy(self.backbone) if copy_backbone else self.backbone)

    def mid_layer(self) -> int:
        return mid_layer(self.num_layers)


def mid_layer(num_layers: int) -> int:
    """The default injection point scaled to a backbone (after layer 3 of MiniLM's 6)."""
    return max(0, num_layers // 2 - 1)


def filler_examples(n: int, seq_len: int) -> list[Example]:
    """SST-2-shaped rows whose prompt fills any `max_length` <= seq_len (one token per word)."""
    words = " ".join(["the movie was good and"] * (seq_len // 5 + 1))
    return [Example(id=f"bench/{i}", prompt=words, response=("positive", "negative")[i % 2], label=i % 2,
                    text=f"bench row {i}") for i in range(n)]


def set_shape(recipe, batch: int, seq_len: int) -> None:
    """Make the recipe's next training batches exactly batch x seq_len tokens."""
    recipe.config.max_length = seq_len
    recipe.config.train.batch_size = batch
    recipe.config.train.group_by_length = False
    recipe.train_examples = filler_examples(2 * batch, seq_len)
    recipe._perm_cache = None
