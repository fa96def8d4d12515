"""The Ray Train worker loop: one `Recipe` per worker, reporting once per evaluation.

Every worker builds the recipe with its world rank and size (the recipe shards the data and
all-reduces gradients when torch.distributed is up, which TorchTrainer does: gloo on CPU, NCCL on
GPU). Resume comes from `ray.train.get_checkpoint()`: the Train run's latest checkpoint after a
worker failure (FailureConfig) or when a Tune trial is restored. Only rank 0 writes checkpoints;
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

Test hook: `test_kill_worker` = "RANK:STEP:MARKER" in the loop config makes that rank
`os._exit(1)` when it reaches evaluation step STEP (5 s later), once (the MARKER file records that it did).
The sweep passes it from the environment variable LORA_DIFFUSION_TEST_KILL_WORKER.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

TEST_KILL_ENV = "LORA_DIFFUSION_TEST_KILL_WORKER"


def _maybe_die(hook: str | None, rank: int, step: int) -> None:
    if not hook:
        return
    want_rank, want_step, marker = hook.split(":", 2)
    if rank == int(want_rank) and step == int(want_step) and not os.path.exists(marker):
        # The Train controller collects reports at its health checks (every 2 s): wait for the
        # previous report's checkpoint to be registered, as it would be in a run whose steps take
        # seconds, so the restart has a checkpoint to resume from.
        time.sleep(5)
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        os._exit(1)


def train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the sweep's TorchTrainer."""
    import ray.train
    from ray.train import Checkpoint

    from ..core import checkpoint, config as config_lib
    from ..core.accounting import account
    from ..core.recipe import Recipe

    t0 = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = config_lib.from_dict(loop_config["config"])
    if config.train.threads is None and loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))  # the CPUs this worker reserved
    recipe = Recipe(config, rank=rank, world_size=world)
    ckpt = ray.train.get_checkpoint()
    replay = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            checkpoint.load_state(Path(d), recipe)
            if (Path(d) / "metrics.json").is_file():
                replay = json.loads((Path(d) / "metrics.json").read_text())
    start = recipe.step
    hook = loop_config.get("test_kill_worker")
    first = {"accounting_json": json.dumps(account(recipe.method))}
    if replay is not None:
        # The checkpoint's own report may never have reached Tune (the driver died while it sat
        # in the report queue): report it again; the tracker skips steps it already logged.
        replay.update(first, resumed_from_step=start)
        first.clear()
        ray.train.report(replay, checkpoint=None)

    def report(metrics: dict, rec) -> None:
        _maybe_die(hook, rank, rec.step)
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        out["step"] = rec.step
        out["resumed_from_step"] = start
        out.update(first)
        first.clear()
        if rec.step >= config.train.steps:
            # The final result rides on the last evaluation's report: a scheduler that stops the
            # trial at its last rung (ASHA stops at max_t) cannot cut it off. `run` returns it.
            result = rec.result(time.perf_counter() - t0)
            result["resumed_from_step"] = start
            rec.result = lambda wall_time, _r=result: _r
            out["result_json"] = json.dumps(result, default=str)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint.save_state(Path(tmp), rec)
                (Path(tmp) / "metrics.json").write_text(json.dumps(out))
                ray.train.report(out, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(out, checkpoint=None)

    recipe.run(report=report, log=None)
