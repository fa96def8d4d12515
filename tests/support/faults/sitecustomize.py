"""Fault injection for tests: kill a Ray Train worker mid-trial, from outside the package.

A test puts this directory first on the driver's PYTHONPATH; Ray's worker processes inherit the
driver's environment, so every Python process of the sweep imports this module at startup.
With LORA_DIFFUSION_TEST_KILL_WORKER=RANK:STEP:MARKER set, `ray.train.report` is wrapped when
`ray.train` is first imported: the Train worker of world rank RANK exits (`os._exit(1)`) when it
is about to report the evaluation of step STEP, once (the MARKER file records that it did).
The sweep's workers call `ray.train.report` through the module (engine/trial.py), so they get
the wrapper. Without the variable this module does nothing.
"""

import functools
import importlib.abc
import os
import sys
import time
from pathlib import Path

KILL_WORKER_ENV = "LORA_DIFFUSION_TEST_KILL_WORKER"


def _dies_at(rank: int, step: int, marker: str):
    def wrap(report):
        @functools.wraps(report)
        def report_or_die(metrics, *args, **kwargs):
            if metrics.get("step") == step and not os.path.exists(marker):
                import ray.train

                if ray.train.get_context().get_world_rank() == rank:
                    # The Train controller collects reports at its health checks (every 2 s):
                    # wait for the previous report's checkpoint to be registered, as it would be
                    # in a run whose steps take seconds, so the restart has one to resume from.
                    time.sleep(5)
                    Path(marker).write_text(f"rank {rank} exited at step {step}\n")
                    os._exit(1)
            return report(metrics, *args, **kwargs)
        return report_or_die
    return wrap


class _WrapAfterExec(importlib.abc.Loader):
    """The loader of `ray.train`, which then replaces the module's `report`."""

    def __init__(self, loader, wrap):
        self.loader, self.wrap = loader, wrap

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.report = self.wrap(module.report)

    def __getattr__(self, name):  # everything else (resources, is_package, ...) as the real loader
        return getattr(self.loader, name)


class _OnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, wrap):
        self.name, self.wrap = name, wrap

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _WrapAfterExec(spec.loader, self.wrap)
                return spec
        return None


def _install() -> None:
    hook = os.environ.get(KILL_WORKER_ENV)
    if not hook:
        return
    rank, step, marker = hook.split(":", 2)
    sys.meta_path.insert(0, _OnImport("ray.train", _dies_at(int(rank), int(step), marker)))


_install()
