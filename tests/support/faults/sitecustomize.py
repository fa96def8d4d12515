"""Fault injection for tests: kill a Ray Train worker mid-trial, from outside the package.

A test puts this directory first on the driver's PYTHONPATH; Ray's worker processes inherit the
driver's environment, so every Python process of the sweep imports this module at startup.
With LORA_DIFFUSION_TEST_KILL_WORKER=RANK:STEP:MARKER set, `ray.train.report` is wrapped when
`ray.train` is first imported: the Train worker of world rank RANK exits (`os._exit(1)`) when it
is about to report the evaluation of step STEP, once (the MARKER file records that it did, and
in which trial).
The sweep's workers call `ray.train.report` through the module (engine/trial.py), so they get
the wrapper.
- LORA_DIFFUSION_TEST_NAN_AT=STEP: the loss of every training step from STEP on is NaN
  (`lora_diffusion.core.step.loss_backward`, what Recipe.train_step calls, wrapped on import):
  the recipe's divergence guard must stop the trial.
- LORA_DIFFUSION_TEST_OOM_WHEN=KEY=VALUE: the training step of a recipe whose flattened config
  has KEY = VALUE raises torch.OutOfMemoryError (`Recipe.train_step` wrapped on import), as a step
  that does not fit its GPU does: the trial must end FAILED with the out-of-memory line while the
  others finish.
- LORA_DIFFUSION_TEST_PAUSE_AT=STEP:MARKER: the Train worker about to report step STEP writes
  MARKER and waits until the test has deleted it (once: MARKER.done records that it did): the
  test changes the world (a store made read-only) at a known step.
Without the variables this module does nothing.
"""

import functools
import importlib.abc
import os
import sys
import time
from pathlib import Path

KILL_WORKER_ENV = "LORA_DIFFUSION_TEST_KILL_WORKER"
NAN_AT_ENV = "LORA_DIFFUSION_TEST_NAN_AT"
OOM_WHEN_ENV = "LORA_DIFFUSION_TEST_OOM_WHEN"


def _oom_when(condition: str):
    key, value = condition.split("=", 1)

    def wrap(recipe_class):
        train_step = recipe_class.train_step

        @functools.wraps(train_step)
        def step_or_oom(self, *args, **kwargs):
            if str(self.config.flat().get(key)) == value:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB "
                                             "(injected by tests/support/faults)")
            return train_step(self, *args, **kwargs)
        recipe_class.train_step = step_or_oom
        return recipe_class
    return wrap


PAUSE_AT_ENV = "LORA_DIFFUSION_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 120  # a test that never deletes the marker does not hang the worker for ever


def _pauses_at(step: int, marker: str):
    def wrap(report):
        @functools.wraps(report)
        def pause_then_report(metrics, *args, **kwargs):
            done = Path(marker + ".done")
            if metrics.get("step") == step and not done.exists():
                time.sleep(5)  # the previous report's checkpoint registered first (see _dies_at)
                done.write_text(f"paused at step {step}\n")
                Path(marker).write_text(f"paused at step {step}\n")
                deadline = time.time() + PAUSE_LIMIT_S
                while Path(marker).exists() and time.time() < deadline:
                    time.sleep(0.2)
            return report(metrics, *args, **kwargs)
        return pause_then_report
    return wrap


def _nan_from(step: int):
    def wrap(loss_backward):
        calls = {"n": 0}

        @functools.wraps(loss_backward)
        def loss_or_nan(*args, **kwargs):
            loss, accuracy = loss_backward(*args, **kwargs)
            calls["n"] += 1  # training steps of this process (a restarted worker counts again)
            return (loss * float("nan") if calls["n"] >= step else loss), accuracy
        return loss_or_nan
    return wrap


def _dies_at(rank: int, step: int, marker: str):
    def wrap(report):
        @functools.wraps(report)
        def report_or_die(metrics, *args, **kwargs):
            if metrics.get("step") == step and not os.path.exists(marker):
                import ray.train

                context = ray.train.get_context()
                if context.get_world_rank() == rank:
                    # The Train controller collects reports at its health checks (every 2 s):
                    # wait for the previous report's checkpoint to be registered, as it would be
                    # in a run whose steps take seconds, so the restart has one to resume from.
                    time.sleep(5)
                    # the Train run is named by the Tune trial id (engine/trial.py): the soak reads it
                    Path(marker).write_text(f"rank {rank} exited at step {step} of trial "
                                            f"{context.get_experiment_name()}\n")
                    os._exit(1)
            return report(metrics, *args, **kwargs)
        return report_or_die
    return wrap


class _WrapAfterExec(importlib.abc.Loader):
    """The loader of `ray.train`, which then replaces the module's `report`."""

    def __init__(self, loader, wrap, attr):
        self.loader, self.wrap, self.attr = loader, wrap, attr

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        setattr(module, self.attr, self.wrap(getattr(module, self.attr)))

    def __getattr__(self, name):  # everything else (resources, is_package, ...) as the real loader
        return getattr(self.loader, name)


class _OnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, wrap, attr: str):
        self.name, self.wrap, self.attr = name, wrap, attr

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _WrapAfterExec(spec.loader, self.wrap, self.attr)
                return spec
        return None


def _install() -> None:
    hook = os.environ.get(KILL_WORKER_ENV)
    if hook:
        rank, step, marker = hook.split(":", 2)
        sys.meta_path.insert(0, _OnImport("ray.train", _dies_at(int(rank), int(step), marker), "report"))
    pause = os.environ.get(PAUSE_AT_ENV)
    if pause:
        step, marker = pause.split(":", 1)
        sys.meta_path.insert(0, _OnImport("ray.train", _pauses_at(int(step), marker), "report"))
    if os.environ.get(NAN_AT_ENV):
        sys.meta_path.insert(0, _OnImport("lora_diffusion.core.step", _nan_from(int(os.environ[NAN_AT_ENV])),
                                          "loss_backward"))
    if os.environ.get(OOM_WHEN_ENV):
        sys.meta_path.insert(0, _OnImport("lora_diffusion.core.recipe", _oom_when(os.environ[OOM_WHEN_ENV]),
                                          "Recipe"))


_install()
