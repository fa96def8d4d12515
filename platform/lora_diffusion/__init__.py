"""LoRA-Diffusion: trajectory-level low-rank modules for masked diffusion language models."""

__version__ = "0.1.0"
