"""The training recipe: setup / train / evaluate, shared by every method.

`Recipe(config).run()` trains on one process. Ray Train workers build the same recipe with a
`rank`/`world_size` (data sharded, gradients all-reduced) and a `report` callback that is
called once per evaluation with the metrics and the recipe itself (to checkpoint it).

Everything random is derived from (seed, step), so a run resumed from step s sees exactly the
batches and masks an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import diagnostics, diffusion, evaluation, generation, precision, sharding, tasks
from .accounting import account
from .backbone import backbone_fingerprint, load_backbone
from .checkpoint import read as read_checkpoint
from .config import Config
from .diffusion import seeded
from .errors import TrainingDiverged, UserError, check, out_of_memory
from .node_cache import loaded_fingerprint
from .recipe_data import RecipeData, task_of
from .step import attach, denoise as denoise_with_context, loss_backward
from .task_specs import run_metric

Report = Callable[[dict, "Recipe"], None]


def default_device() -> torch.device:
    """The GPU where there is one (Ray Train hands a worker its GPU as cuda:0 of its visible
    devices; engine/trial.py passes `ray.train.torch.get_device()`), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Recipe(RecipeData):
    def __init__(self, config: Config, *, rank: int = 0, world_size: int = 1, backbone=None, device=None,
                 shard: bool | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        tr = config.train
        if tr.threads:
            torch.set_num_threads(tr.threads)
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = precision.resolve(tr.precision, self.device)
        # data first: a bad data path fails before any model is loaded
        self.spec = tasks.get_task(config.task)
        self.train_examples = self._load_train()
        # validation: every choice (rates, sizes, the best trial); test: the task's test split,
        # or test_file, reported
        self.validation_examples = self._load("validation", max_examples=config.max_eval_examples)
        self.test_examples = self._load("test", data_file=config.test_file,
                                        max_examples=config.max_eval_examples)
        self.overlap = self._check_overlap()
        torch.manual_seed(config.backbone_seed)  # a head-less encoder gets a seeded MLM head
        self.backbone = backbone or load_backbone(config.backbone, trust_remote_code=config.trust_remote_code,
                                                  allow_hub=config.allow_hub, family=config.backbone_family)
        positions = getattr(self.backbone.config, "max_position_embeddings", None) or config.max_length
        check(config.max_length <= positions, "max_length", f"exceeds the backbone's {positions} positions")
        # of the weights as stored; one loaded here is hashed once per node (core/node_cache.py)
        self.fingerprint = (backbone_fingerprint(self.backbone) if backbone is not None
                            else loaded_fingerprint(self.backbone, config.backbone_seed))
        self.tokenizer = self.backbone.tokenizer
        self.label_ids = (tasks.label_word_token_ids(self.spec, self.tokenizer)
                          if self.spec.kind == "classification" else None)
        torch.manual_seed(tr.seed)  # the method's own initialisation varies with the run seed
        self.method = attach(config, self.backbone, self.precision, self.device)
        # FSDP2 (core/sharding.py) for full fine-tuning on several ranks, or when the memory plan
        # says the backbone does not fit one device (`shard`); its parameters become DTensors
        self.sharded = (config.method == "full" if shard is None else shard) and self._distributed()
        if self.sharded:
            sharding.shard_backbone(self.backbone)
        self.params = list(self.method.trainable().values())
        self.diagnostics = diagnostics.Diagnostics(self)  # per-t bound, phase gains
        # a method with nothing to train (a training-free router mode) has no optimizer and runs no steps
        self.optimizer = (torch.optim.AdamW(self.params, lr=tr.lr, weight_decay=tr.weight_decay)
                          if self.params else None)
        self.step = 0
        self.train_time = 0.0
        self.train_tokens = 0
        self.last_loss = float("nan")
        self._final: tuple[int, dict] | None = None  # (step, result) of `final_result`
        self._evaluated: dict[str, tuple] = {}  # split -> (key, out) of its last `evaluate`
        self._elbo_terms: tuple = (None, None)  # (key, terms) of the last `reference_elbo_terms`

    @classmethod
    def from_checkpoint(cls, directory, overrides: dict | None = None) -> Recipe:
        config, tensors, meta = read_checkpoint(directory, overrides)
        recipe = cls(config)
        if recipe.fingerprint != meta["backbone_fingerprint"]:
            raise UserError(f"checkpoint: the backbone '{config.backbone}' differs from the one "
                            f"{directory} was trained on (fingerprint mismatch)")
        try:
            recipe.method.load_saved({k: v.to(recipe.device) for k, v in tensors.items()})
        except (ValueError, RuntimeError) as exc:  # tensors that do not fit the configured method
            raise UserError(f"checkpoint {directory}: {exc}") from None
        return recipe

    # ------------------------------------------------------------------------- model
    def denoise(self, input_ids, attention_mask, select, t, prompt_mask=None, task_ids=None,
                hidden: bool = False):
        """Logits (or, with `hidden`, the head's input) at `select`, the method told t (core/step.py)."""
        return denoise_with_context(self, input_ids, attention_mask, select, t, prompt_mask, task_ids, hidden)

    def denoiser(self, batch: diffusion.Batch):
        """`denoise` bound to a batch's prompt positions (routers pool the prompt) and task ids."""
        return lambda ids, attn, select, t: self.denoise(ids, attn, select, t, batch.prompt_mask,
                                                         batch.task_ids)

    def lr_at(self, step: int) -> float:
        tr = self.config.train
        if step < tr.warmup_steps:
            return tr.lr * (step + 1) / tr.warmup_steps
        progress = (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)
        return tr.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine decay

    # ------------------------------------------------------------------------- train
    def train_step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        self.method.train()
        batch = self.encode(self.train_batch(self.step))
        gen = seeded(c.train.seed, self.step, self.rank, 1)
        torch.manual_seed(int(torch.randint(2**62, (), generator=seeded(c.train.seed, self.step, self.rank, 2))))
        # ^ dropout draws from the global generator: seeding it per step makes resume exact
        noise = diffusion.draw_noise(batch, self.backbone.mask_token_id, c.diffusion.noise_schedule,
                                     c.diffusion.t_min, gen)
        weights = diffusion.token_loss_weights(batch, noise, c.diffusion.noise_schedule,
                                               generation.train_weights(self, batch))
        self.optimizer.zero_grad(set_to_none=False)
        loss, accuracy = loss_backward(self, batch, noise, weights, c.train.micro_batch_size,
                                            c.train.logits_chunk_rows)
        self._check_finite(loss, "loss")
        try:
            reg, reg_logs = self.method.regularization()
        except torch.linalg.LinAlgError:  # an SVD of non-finite parameters (a NaN gradient before)
            raise TrainingDiverged(f"training diverged at step {self.step + 1}: non-finite parameters") from None
        self._check_finite(reg, "regularizer")
        if reg.requires_grad:
            reg.backward()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        self._sync_gradients()
        if c.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, c.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.method.after_step(self.step)
        self.train_time += time.perf_counter() - t0
        self.train_tokens += int(batch.attention_mask.sum()) * self.world_size
        self.last_loss = float(loss)
        return {"train/loss": self.last_loss, "train/masked_accuracy": accuracy,
                **{f"train/{k}": v for k, v in reg_logs.items()}}

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        """The divergence guard: one line naming the step and the value, before the optimizer sees it."""
        if not torch.isfinite(value):
            raise TrainingDiverged(f"training diverged at step {self.step + 1}: {what} {float(value.detach()):g} "
                                   "(lower train.lr or set train.grad_clip)")

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def _sync_gradients(self) -> None:
        """Average gradients over ranks in one flat all_reduce instead of DDP: per-phase modules
        that a batch did not use have no gradient, which DDP would reject without
        find_unused_parameters (they send zeros). FSDP-sharded parameters are reduced by FSDP."""
        if self._distributed():
            sharding.average_gradients(self.params, self.world_size)

    # ------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, examples, split: str, sampler: bool = True, batch_size: int | None = None) -> dict:
        """Classification: accuracy, label words scored by the ELBO (averaged over t,
        stratified by phase; label words of several tokens compare their ELBO per token) and,
        when `sampler`, generated by the reverse sampler, with a note of the times it
        exercises (`sampler_note`); core/evaluation.py. Generation: the reference's ELBO and,
        except on train and unless generation.text_scores is false, the task's scores of
        generated text whatever `sampler` says (generation.py). What this split already got at this
        step and these parameters (the last periodic validation, which the final result repeats) is
        not computed again."""
        self.method.eval()
        c = self.config
        batch_size = batch_size or c.evaluation.batch_size
        times = diffusion.stratified_times(self.method.phase_boundaries(), c.diffusion.eval_t_points,
                                           c.diffusion.t_min)
        key = self.state_key(examples)
        known = self._evaluated[split][1] if self._evaluated.get(split, (None,))[0] == key else {}
        if self.spec.kind == "classification":
            out = evaluation.classification(self, examples, split, times, sampler, batch_size, known)
        else:  # generation tasks: the reference's ELBO and scores of generated text
            out = dict(known) or generation.evaluate(self, examples, split, times, batch_size,
                                                     seeded(c.train.seed, 13))
        out[f"{split}/examples"] = len(examples)
        if split in self.overlap:
            out[f"{split}/overlap"] = self.overlap[split]
        self._evaluated[split] = (key, out)
        return out

    def reference_elbo_terms(self, examples, times, batch_size: int | None = None):
        """Generation: the reference ELBO per t of `times` before the sum (nats per response
        token, generation.reference_elbo_by_point) under evaluation's masks, seeded(train.seed,
        7), with every module on. Kept for the last state and rows asked: the test ELBO's terms
        are the phase gains' all-on pass (core/diagnostics.py), not a second one."""
        batch_size = batch_size or self.config.evaluation.batch_size
        key = (self.state_key(examples), tuple(times), batch_size)
        if self._elbo_terms[0] != key:
            self._elbo_terms = (key, generation.reference_elbo_by_point(
                self, examples, times, batch_size, seeded(self.config.train.seed, 7)))
        return self._elbo_terms[1]

    def state_key(self, examples) -> tuple:
        """What an evaluation's figures depend on: the step, the rows, and the version counters
        of every tensor of the method and backbone (a step or a load moves them)."""
        tensors = (*self.method.parameters(), *self.method.buffers())
        return self.step, tuple(e.id for e in examples), tuple(t._version for t in tensors)

    # ------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"method": self.method.state_to_save(), "method_train": self.method.training_state(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else {},
                "step": self.step, "train_time": self.train_time, "train_tokens": self.train_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_saved(state["method"])
        self.method.load_training_state(state.get("method_train", {}))
        if self.optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.train_time = state["step"], state["train_time"]
        self.train_tokens = state["train_tokens"]
        self.method.after_step(self.step)  # schedules that follow the step counter resume with it

    # ------------------------------------------------------------------------- run
    def run(self, report: Report | None = None, log: Callable[[str], None] | None = print) -> dict:
        """Train to `train.steps`, evaluating on validation every `eval_every` steps; returns the
        result."""
        tr = self.config.train
        wall0 = time.perf_counter()
        while self.params and self.step < tr.steps:  # nothing to train: evaluated as built
            try:
                metrics = self.train_step()
            except torch.OutOfMemoryError as exc:  # an answer, not a crash: the knobs that lower it
                raise out_of_memory(self.step + 1, exc) from None
            if log and self.step % 50 == 0 and self.step % tr.eval_every:
                log(f"step {self.step:5d}  loss {metrics['train/loss']:.4f}  "
                    f"{self.train_time / self.step:.3f} s/step")
            if self.step % tr.eval_every == 0 or self.step == tr.steps:
                metrics.update(self.evaluate(self.validation_examples, "validation", sampler=False))
                metrics.update(self.diagnostics.per_t(self.validation_examples, "validation",
                                                      final=self.step >= tr.steps))
                metrics["step"] = self.step
                if log:
                    metric = f"validation/{run_metric(self.config.task, self.config.generation.text_scores)}"
                    log(f"step {self.step:5d}  loss {metrics['train/loss']:.4f}  {metric} "
                        f"{metrics.get(metric, float('nan')):.4f}")
                if report:
                    report(metrics, self)
        return self.final_result(time.perf_counter() - wall0)

    def final_result(self, wall_time: float) -> dict:
        """`result` at the current step, computed once: a `report` callback that needs it at the
        last step (the sweep's Train worker) and `run`'s return share one evaluation."""
        if self._final is None or self._final[0] != self.step:
            self._final = (self.step, self.result(wall_time))
        return self._final[1]

    def result(self, wall_time: float) -> dict:
        """The final result. A result run (evaluation.role) scores a train subset, validation and
        test; a search trial validation only (its test is never scored: selection may not see it,
        and the retrain of the selection scores test)."""
        c = self.config
        res = {"task": c.task, "method": c.method, "steps": self.step, "seed": c.train.seed,
               "split_note": self.spec.split_note, "train/loss": self.last_loss}
        search = c.evaluation.role == "search"
        rng = seeded(c.train.seed, 17)
        own = [e for e in self.train_examples if task_of(e) == c.task]  # a mixture's: the run's task's rows
        n = 0 if search else min(c.train_accuracy_examples, len(own))
        train_subset = [own[i] for i in torch.randperm(len(own), generator=rng)[:n].tolist()]
        if train_subset:  # none when a router's mixture leaves out the run's task
            res.update(self.evaluate(train_subset, "train", sampler=False))
        res.update(self.evaluate(self.validation_examples, "validation"))
        res.update(self.diagnostics.per_t(self.validation_examples, "validation"))  # the last periodic one
        last, split = (self.validation_examples, "validation") if search else (self.test_examples, "test")
        if not search:
            res.update(self.evaluate(self.test_examples, "test"))
            res["test/source"] = c.test_file or f"{c.task} test split"
        res.update(self.diagnostics.phase_gains(last, split, res))
        res["accounting"] = account(self.method)
        res["wall_time_s"] = wall_time
        res["train_time_s"] = self.train_time
        res["step_time_s"] = self.train_time / max(self.step, 1)
        res["tokens_per_s"] = self.train_tokens / max(self.train_time, 1e-9)
        res["peak_memory_mb"] = peak_memory_mb(self.device)
        res["peak_memory_kind"] = "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"
        res["backbone"] = {"source": self.backbone.source, "fingerprint": self.fingerprint}
        return res
