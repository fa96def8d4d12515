"""A sweep trial: a Tune function trainable that fits a Ray Train `TorchTrainer`, whose workers
each run one `Recipe` and report once per evaluation.

Every worker builds the recipe with its world rank and size (the recipe shards the data and
all-reduces gradients when torch.distributed is up, which TorchTrainer does: gloo on CPU, NCCL on
GPU). Resume comes from `ray.train.get_checkpoint()`: the Train run's latest checkpoint after a
worker failure (FailureConfig) or when a Tune trial is restored. Only rank 0 writes checkpoints
(every rank of an FSDP-sharded recipe writes its shard, and Train merges them into one);
every rank calls `ray.train.report` (it is collective in Train V2).

A checkpoint directory holds the resume checkpoint `core.checkpoint.save_state` writes (the
method as `lora-diffusion eval --checkpoint` reads it, its optimizer and counters) plus
metrics.json, the metrics reported with it (replayed on resume).

Reported metrics: the recipe's metrics plus `step` (the recipe's own counter), `resumed_from_step`
(where this Train run started: 0, or the checkpoint's step); the first report of a run also
carries `accounting_json`, and the report of the last step carries `result_json` (the final
result with split-labelled accuracies and accounting; `wall_time_s` in it counts from the start
of the Train run that finished). A run resumed from a checkpoint first re-reports that
checkpoint's metrics (they may never have reached Tune).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import checkpoint, config as config_lib
from . import search_space as space_lib


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares (passed to the trainable with `tune.with_parameters`)."""
    fixed: dict  # config overrides under the trial's sampled params
    workers: int  # Ray Train workers per trial
    cpus_per_worker: float
    gpus_per_worker: float
    train_storage: str  # where the trials' Train runs (and their checkpoints) live
    max_failures: int  # worker-group restarts per trial
    shard: bool | None = None  # FSDP2 over the ranks (None: the recipe decides: method=full)
    backend: str | None = None  # torch.distributed's (None: Ray's choice, nccl with GPUs, else gloo)
    extra_resources: dict | None = None  # custom Ray resources per worker (--worker-resources)


def run_trial(params: dict, plan: TrialPlan) -> None:
    """Tune function trainable: resolve the trial's config and fit a TorchTrainer on it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()  # the trial's actor is running: Tune's share of start-up ends here
    trial_id = tune.get_context().get_trial_id()
    config = config_lib.from_dict({}, {**plan.fixed, **space_lib.overrides(params)})
    # name: deterministic, so a restored trial finds its own Train run and checkpoint
    make_trainer(config.to_dict(), plan, trial_id, started, [TuneReportCallback()]).fit()


def make_trainer(config: dict, plan: TrialPlan, name: str, started: float, callbacks: list,
                 keep: int | None = 2, loop=None):
    """The TorchTrainer of one Train run: `plan.workers` workers running `loop` (`train_loop`)
    on `config` (a Config as a dict), its run `name` under `plan.train_storage`, `keep`
    checkpoints (None: all). A sweep trial fits it under Tune; the benchmark's scaling section
    fits it alone. Each worker reserves `plan.gpus_per_worker` (a share of one GPU, or one) and
    `plan.extra_resources`.

    A worker lost with its node is a worker-group failure to Ray Train 2.60 (the controller's
    health check gets the actor's death, `WorkerGroupError`; a node drained for preemption counts
    against FailureConfig.max_preemption_failures instead, unlimited by default): the group
    restarts, up to `plan.max_failures` times (--max-failures, default 2), on whatever nodes
    have the resources, from the run's latest checkpoint. The Tune trial does not fail, so its
    MLflow run and step axis go on (tests/test_node_loss.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": plan.cpus_per_worker, **(plan.extra_resources or {})}
    if plan.gpus_per_worker:
        per_worker["GPU"] = plan.gpus_per_worker
    return TorchTrainer(
        loop or train_loop,
        train_loop_config={"config": config, "threads": max(1, int(plan.cpus_per_worker)), "trial_started": started,
                           "shard": plan.shard},
        torch_config=TorchConfig(backend=plan.backend or ("nccl" if plan.gpus_per_worker else "gloo")),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=bool(plan.gpus_per_worker),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=plan.train_storage,
                             failure_config=FailureConfig(max_failures=plan.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=callbacks),
    )


# ----------------------------------------------------------------------------- the Train worker


def train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the trial's TorchTrainer."""
    import ray.train
    import ray.train.torch

    from ..core.recipe import Recipe

    t0 = time.perf_counter()
    started = time.time()  # the worker group is up: Train's share of start-up ends here
    ctx = ray.train.get_context()
    config = config_lib.from_dict(loop_config["config"])
    if config.train.threads is None and loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))  # the CPUs this worker reserved
    recipe = Recipe(config, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), shard=loop_config.get("shard"))
    reporter = Reporter(recipe, t0)
    reporter.timing.begin(loop_config.get("trial_started", started), started, recipe)
    reporter.resume()
    recipe.run(report=reporter, log=None)


class Reporter:
    """The recipe's `report` callback on a Train worker: metrics to Tune, checkpoints from rank 0."""

    def __init__(self, recipe, t0: float):
        self.recipe, self.t0 = recipe, t0
        self.start = 0  # the step this Train run started from
        self.first: dict = {}  # what the first report of this Train run carries
        self.timing = Timing()

    def resume(self) -> None:
        """Load the Train run's latest checkpoint, if any, and report its metrics again: they may
        never have reached Tune (the driver died while they sat in the report queue); the tracker
        skips steps it already logged."""
        import ray
        import ray.train

        from ..core.accounting import account

        ckpt = ray.train.get_checkpoint()
        replay = None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                checkpoint.load_state(Path(d), self.recipe)
                if (Path(d) / "metrics.json").is_file():
                    replay = json.loads((Path(d) / "metrics.json").read_text())
        self.start = self.recipe.step
        # the GPUs Ray gave this rank (its CUDA_VISIBLE_DEVICES): what a packed sweep is checked by
        self.first = {"accounting_json": json.dumps(account(self.recipe.method)),
                      "gpu_ids_json": json.dumps([str(g) for g in ray.get_gpu_ids()])}
        if replay is not None:
            replay.update(self.first, resumed_from_step=self.start)
            self.first.clear()
            ray.train.report(replay, checkpoint=None)

    def __call__(self, metrics: dict, rec) -> None:
        import ray.train
        from ray.train import Checkpoint

        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        out["step"] = rec.step
        out["resumed_from_step"] = self.start
        out.update(self.first)
        self.first.clear()
        if rec.step >= rec.config.train.steps:
            # The final result rides on the last evaluation's report: a scheduler that stops the
            # trial at its last rung (ASHA stops at max_t) cannot cut it off. `run` returns the
            # same result (computed once).
            with self.timing.phase("final_eval"):
                result = {**rec.final_result(time.perf_counter() - self.t0), "resumed_from_step": self.start}
            out["result_json"] = json.dumps(result, default=str)
        out.update(self.timing.figures(rec))
        if rec.rank == 0 or rec.sharded:  # a sharded recipe: every rank writes its shard, Train merges them
            with tempfile.TemporaryDirectory() as tmp:
                with self.timing.phase("checkpoint"):
                    checkpoint.save_state(Path(tmp), rec)
                    if rec.rank == 0:
                        (Path(tmp) / "metrics.json").write_text(json.dumps(out))
                with self.timing.phase("report"):
                    ray.train.report(out, checkpoint=Checkpoint.from_directory(tmp))
        else:
            with self.timing.phase("report"):
                ray.train.report(out, checkpoint=None)


class Timing:
    """Where a trial's time goes, reported with every evaluation as `timing/*` (seconds, or unix
    times `*_at`): start-up split into Tune (trial scheduled -> its actor runs: not seen here),
    the Train worker group (actor -> worker loop) and set-up (data, backbone, method); then
    training steps (and `train_tokens`, the tokens they trained on, as the recipe counts them),
    evaluation, checkpointing and the hand-off to Tune (`ray.train.report`, which waits for the
    driver to take the previous result), each summed over this Train run. The
    figures of one report cover the phases before it (its own checkpoint and hand-off go in the
    next)."""

    def __init__(self):
        self.spent: dict[str, float] = {"checkpoint": 0.0, "report": 0.0, "final_eval": 0.0}
        self.marks: dict[str, float] = {}

    def begin(self, trial_started: float, worker_started: float, recipe) -> None:
        self.marks = {"trial_started_at": trial_started, "worker_started_at": worker_started,
                      "ready_at": time.time()}
        self.train0 = recipe.train_time  # a resumed run counts only its own steps
        self.tokens0 = recipe.train_tokens

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] += time.perf_counter() - t0

    def figures(self, recipe) -> dict[str, float]:
        if not self.marks:
            return {}
        now = time.time()
        train = recipe.train_time - self.train0
        busy = now - self.marks["ready_at"]
        spent = self.spent
        return {**{f"timing/{k}": v for k, v in self.marks.items()}, "timing/reported_at": now,
                "timing/worker_startup_s": self.marks["worker_started_at"] - self.marks["trial_started_at"],
                "timing/setup_s": self.marks["ready_at"] - self.marks["worker_started_at"],
                "timing/train_s": train, "timing/train_tokens": recipe.train_tokens - self.tokens0,
                "timing/checkpoint_s": spent["checkpoint"], "timing/report_s": spent["report"],
                "timing/final_eval_s": spent["final_eval"],
                "timing/eval_s": busy - train - spent["checkpoint"] - spent["report"]}
