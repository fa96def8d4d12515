"""A trained checkpoint as a model a user's harness calls: `lora_diffusion.load(DIR)`.

    import lora_diffusion
    model = lora_diffusion.load("exported/")            # a checkpoint or a `--format native` export
    logits = model.logits(input_ids, attention_mask, t)  # [B, S, V], the method told t
    texts = model.generate(["Question: ... Answer:"])    # the reverse sampler (core/diffusion.py)

It builds what evaluation builds, without a task's data: the backbone the checkpoint names
(checked against its fingerprint), the method attached as a run attaches it (core/step.py), its
saved tensors loaded, everything in eval mode. `logits` and `generate` hand the method its t
through the Context exactly as training and evaluation do, so a trajectory module, T-LoRA, NaRA
or a router runs the module of the step's t. Relative paths in a native export's config
(`router.checkpoints`, the experts it carries) are read against the export's directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import diffusion, generation, precision
from .backbone import Backbone, backbone_fingerprint, load_backbone
from .checkpoint import read as read_checkpoint
from .errors import UserError
from .step import attach, denoise


@dataclass
class LoadedModel:
    """A method on its backbone, ready for inference: what `load` returns."""

    method: torch.nn.Module
    backbone: Backbone
    config: object  # core.config.Config, as trained
    precision: str
    device: torch.device

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, t, select=None, task_ids=None) -> torch.Tensor:
        """Logits at every position [B, S, V] (or at `select` [N, V]), the method told the
        diffusion time `t` (a float or [B]): the platform's own forward (core/step.py denoise)."""
        ids = torch.as_tensor(input_ids, device=self.device)
        attn = torch.as_tensor(attention_mask, device=self.device)
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(ids.shape[0]).clone().to(self.device)
        rows = torch.ones_like(ids, dtype=torch.bool) if select is None else torch.as_tensor(select)
        if task_ids is None:
            task_ids = torch.full((ids.shape[0],), self.config.trajectory.task_id, dtype=torch.long)
        out = denoise(self, ids, attn, rows.to(self.device), t, attn.bool(), task_ids.to(self.device))
        return out.float() if select is not None else out.float().view(*ids.shape, -1)

    @torch.no_grad()
    def generate(self, prompts: list[str], response_tokens: int | None = None, steps: int | None = None,
                 seed: int = 0) -> list[str]:
        """Each prompt's response, decoded by the reverse sampler from `response_tokens` masks in
        `steps` steps (defaults: the run's generation.response_tokens and diffusion.sampler_steps,
        which per-step modules were trained for), cut at the first end token."""
        c = self.config
        steps = steps or c.diffusion.sampler_steps
        length = response_tokens or c.generation.response_tokens or steps
        mask_id, end_id = self.backbone.mask_token_id, generation.end_token_id(self.tokenizer)
        b = diffusion.encode(self.tokenizer, list(prompts), [[mask_id] * length] * len(prompts), c.max_length)
        task_ids = torch.full((len(prompts),), c.trajectory.task_id, dtype=torch.long)
        batch = diffusion.Batch(*(x.to(self.device) for x in
                                  (b.input_ids, b.attention_mask, b.response_mask, b.prompt_mask, task_ids)))

        def run(ids, attn, select, t):
            return denoise(self, ids, attn, select, t, batch.prompt_mask, batch.task_ids)

        gen = torch.Generator().manual_seed(seed)
        ids = diffusion.sample(run, batch, mask_id, steps, c.diffusion.remasking, gen,
                               c.diffusion.noise_schedule, c.diffusion.block_length)
        return [generation.surface_text(self.tokenizer, generation.cut_at_end(row[resp].tolist(), end_id), p)
                for p, row, resp in zip(prompts, ids, batch.response_mask)]


def _relative_experts(directory: Path) -> dict:
    """A native export keeps a router's experts beside it, named relative to its directory."""
    data = json.loads((directory / "config.json").read_text())
    paths = (data.get("router") or {}).get("checkpoints") or []
    if not any(not Path(p).is_absolute() for p in paths):
        return {}
    return {"router.checkpoints": [str(directory / p) if not Path(p).is_absolute() else p for p in paths]}


def load(directory, device: str | torch.device | None = None, policy: str = "fp32") -> LoadedModel:
    """The checkpoint in `directory` (`lora-diffusion train`'s output, a sweep trial's, or a
    `lora-diffusion export --format native`) as a `LoadedModel` on `device` (default: the CPU)
    under the precision `policy` (fp32, bf16-mixed, bf16). A backbone that differs from the one
    trained on (fingerprint) is refused."""
    directory = Path(directory)
    device = torch.device(device or "cpu")
    overrides = {"train.gradient_checkpointing": False, **_relative_experts(directory)} \
        if (directory / "config.json").is_file() else None
    config, tensors, meta = read_checkpoint(directory, overrides)
    torch.manual_seed(config.backbone_seed)  # a head-less encoder's head, as the run seeded it
    backbone = load_backbone(config.backbone, trust_remote_code=config.trust_remote_code,
                             allow_hub=config.allow_hub, family=config.backbone_family)
    if backbone_fingerprint(backbone) != meta["backbone_fingerprint"]:
        raise UserError(f"checkpoint: the backbone '{config.backbone}' differs from the one {directory} "
                        "was trained on (fingerprint mismatch)")
    torch.manual_seed(config.train.seed)
    policy = precision.resolve(policy, device)
    method = attach(config, backbone, policy, device)
    try:
        method.load_saved({k: v.to(device) for k, v in tensors.items()})
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {directory}: {exc}") from None
    method.eval()
    return LoadedModel(method=method, backbone=backbone, config=config, precision=policy, device=device)
