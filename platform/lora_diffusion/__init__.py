"""LoRA-Diffusion: trajectory-level low-rank modules for masked diffusion language models.

Four layers; a module imports its own layer and those below it, never one above
(tests/test_layout.py holds this, with no import cycles):

    core         the method and its recipe: config, backbones, diffusion, tasks, methods/
    engine       the only layer that talks to Ray Tune / Train, Optuna and MLflow: sweeps
    analysis     reading back: trials from MLflow, statistics, plots, reports, tables
    experiments  what launches sweeps and reads them back: comparison, composition, bench, soak
    cli.py       `lora-diffusion VERB`, on top; jobs/*.py are thin wrappers of its verbs

core imports Ray, MLflow and Optuna only inside functions, never at module level: a Ray Train
worker, a test or `lora-diffusion train` loads core without them. See CONTRIBUTING.md.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`lora_diffusion.load(DIR)`: a checkpoint as a model with `logits` and `generate`
    (core/loader.py), imported on first use so that `import lora_diffusion` stays light."""
    if name == "load":
        from .core.loader import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
