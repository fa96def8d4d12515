"""The one small interface every fine-tuning method implements (peft-tuner style).

A method attaches to a `Backbone`, owns the parameters it trains, is told the diffusion time
of every sample before each forward (`set_context`), may add regularisation terms, and saves
exactly its trainable tensors. The training loop, loss, evaluation and accounting are shared:
they only ever talk to this interface.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class Context:
    """What the loop knows about the current forward pass that the network itself does not."""

    t: torch.Tensor  # [B] diffusion time of each sample
    prompt_mask: torch.Tensor | None = None  # [B, S] bool, prompt positions (routers pool them)
    task_ids: torch.Tensor | None = None  # [B] long, for task-conditioned modules


class Method(nn.Module):
    name = "base"
    # False for a method nothing of which reads the Context (weight LoRA, adapters, BitFit, ...):
    # its logits are the same at every t, and evaluation computes them once (core/evaluation.py)
    reads_context = True
    # Rows of these tasks carry this task id (Context.task_ids) instead of the run's
    # trajectory.task_id: a router's experts' own tasks, so a task mixture's rows and the oracle
    # see each row's true task (router.py). Default: none.
    task_id_by_task: dict[str, int] = {}

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__()
        self.config = config
        self.model = backbone.model  # a submodule, so full fine-tuning and PEFT see its params
        self.backbone_params = backbone.parameter_count()  # counted before anything is attached
        self.context: Context | None = None
        self._hooks: list = []  # handles of the hooks the method puts on the backbone
        self._start: dict[str, torch.Tensor] | None = None  # `remember_start`'s copies
        for p in backbone.model.parameters():  # frozen unless the method says otherwise
            p.requires_grad_(False)

    # --- what is trained and saved -------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """Named trainable parameters; exactly these tensors are saved and counted."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.trainable().items()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing = sorted(set(params) - set(tensors))
        extra = sorted(set(tensors) - set(params))
        if missing or extra:
            raise ValueError(f"checkpoint does not match the method: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        wrong = [f"{n} {tuple(tensors[n].shape)} (expected {tuple(p.shape)})"
                 for n, p in params.items() if tensors[n].shape != p.shape]
        if wrong:  # copy_ would broadcast some of them silently
            raise ValueError(f"checkpoint tensor shapes do not match its config: {', '.join(wrong[:2])}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def accounting_extras(self) -> dict[str, object]:
        """Figures `account` adds beside the counts: a method whose counted (saved) size differs
        from what it uses reports the used size here (SeLoRA's active ranks). Default: none."""
        return {}

    def saved_settings(self) -> dict[str, object]:
        """`section.key -> value` settings the method resolved while it was built (GeLoRA's
        estimated dimensions), written into the checkpoint's config: building from that config
        reproduces the method without what the estimate read. Default: none."""
        return {}

    def training_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors the saved file leaves out, which only resuming needs: a method that
        trains through a reparameterisation it drops when saving (prefix tuning's MLP) returns
        them here. Default: none, the saved tensors are what trains."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"training state of a method that keeps none: {sorted(tensors)[:3]}")

    # --- per-forward hooks -------------------------------------------------------------
    def set_context(self, context: Context | None) -> None:
        self.context = context

    def regularization(self) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted total added to the loss, raw values to log). Default: none."""
        return torch.zeros(()), {}

    def after_step(self, step: int) -> None:
        """Told the number of optimizer steps done, after each step and once on resume (before
        any gradient exists), by methods whose schedule follows training (AdaLoRA's rank budget,
        SeLoRA's growth, Solo Connection's homotopy). Default: nothing."""

    def context_free_blocks(self) -> int | None:
        """How many leading blocks run a forward the Context cannot change (a forward hook on
        them may read it, but must not edit the block's output in place): evaluation runs them
        once for the forwards of a batch at several t and replays their outputs
        (core/evaluation.py). None: nothing the method adds reads the Context, so the logits
        are the same at every t. Default: None where `reads_context` is False, else 0, which
        reuses nothing and is always right."""
        return 0 if self.reads_context else None

    def phase_boundaries(self) -> list[float]:
        """Phases over (0, 1] that evaluation stratifies t over; one phase by default."""
        return [0.0, 1.0]

    # --- switched off: the backbone alone (core/diagnostics.py) --------------------------
    def remember_start(self) -> None:
        """Keep a copy of the trainable tensors as built, which `switched_off` puts back: every
        method's update starts at zero (LoRA's B, an adapter's up-projection), or at the
        backbone's own values (BitFit's biases, full fine-tuning's weights). Costs one copy of
        the trainable tensors (for full fine-tuning, of the model)."""
        self._start = {n: p.detach().clone() for n, p in self.trainable().items()}

    @contextlib.contextmanager
    def switched_off(self, phases=None):
        """The backbone alone while inside: the method's hooks out of their modules (put back in
        their places after), and the trainable tensors as built if `remember_start` kept them
        (PEFT tuners, BitFit and full fine-tuning change the model without hooks). Tensors are
        swapped by `.data`, which leaves their version counters (Recipe.evaluate's cache) alone.
        `phases`: only the modules of those phases, for methods with phase modules."""
        if phases is not None:
            raise ValueError(f"method {self.name} has no phase modules to switch off")
        params = self.trainable()
        live = {n: params[n].data for n in self._start or {}}
        with _hooks_suspended(self._hooks):
            try:
                for n in live:
                    params[n].data = self._start[n]
                yield
            finally:
                for n, data in live.items():
                    params[n].data = data

    def phase_modules(self) -> list[int]:
        """The phases (indices into `phase_boundaries`) that own a module `switched_off(phases)`
        can switch off; none by default."""
        return []

    def remove(self) -> None:
        """Take the method's hooks off the backbone: the model runs as before it was attached."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


@contextlib.contextmanager
def _hooks_suspended(handles):
    """Take the hooks of `handles` out of their modules' hook tables, and put every table back
    as it was, order included, after (a removed-and-registered hook would run last)."""
    tables = {}
    for h in handles:
        for ref in (h.hooks_dict_ref, *getattr(h, "extra_dict_ref", ())):
            table = ref()
            if table is not None and id(table) not in tables:
                tables[id(table)] = (table, list(table.items()))
    for h in handles:
        for table, _ in tables.values():
            table.pop(h.id, None)
    try:
        yield
    finally:
        for table, items in tables.values():
            table.clear()
            table.update(items)
