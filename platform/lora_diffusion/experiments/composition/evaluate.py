"""The composition job's evaluations (composition.py, step 3), in this process, one Recipe each.

Every evaluation scores one module or composition on one task's test split (its fixed
`eval_examples` rows; classification by the ELBO of the label words, generation by the sampler's
text) and is written to the record at once: `evaluations["<kind>|<name>|<seed>|<task>"]` =
{kind, name, seed, task, metric, value, scores, accounting, routing_accuracy}. A rerun skips
what the record holds.

  module       trajectory:<A> on every task B (the interference matrix); lora:<A> on A only
               (the reference of the merges)
  composition  router-trained (the stage-2 checkpoint), router-uniform / -oracle / -energy
               (built from the seed's trajectory modules: nothing to train), lora-linear / -cat /
               -ties (lora_merge over the seed's lora modules)
"""

from __future__ import annotations

import json
import time

from ...core import config as config_lib
from ...core.checkpoint_files import read_files
from ...core.task_specs import run_metric

KINDS = ("module", "composition")


class Record:
    """The job's record beside its sweeps: the selection and every finished evaluation."""

    def __init__(self, storage, rel: str, name: str, spec, chosen: dict):
        self.storage, self.rel = storage, rel
        self.data = json.loads(storage.read_text(rel)) if storage.exists(rel) else {"evaluations": {}}
        self.data.update(name=name, tasks=list(spec.tasks), seeds=list(spec.seeds),
                         metrics={t: spec.metric(t) for t in spec.tasks},
                         selected=[{"task": t, "method": m, "lr": c["lr"], "validation": c["validation"]}
                                   for (t, m), c in chosen.items()])

    def has(self, key: str) -> bool:
        return key in self.data["evaluations"]

    def put(self, key: str, entry: dict) -> None:
        self.data["evaluations"][key] = entry
        self.storage.write_text(self.rel, json.dumps(self.data, indent=2, default=str))


def eval_overrides(spec, task: str) -> dict:
    """Settings that make a module trained on one task score another: the task, its context
    length and response form, its task id (the oracle's truth), the fixed evaluation rows."""
    return {"task": task, "generation.response_tokens": None, "diffusion.sampler_steps": None,
            "trajectory.task_id": spec.task_id(task), "max_eval_examples": spec.eval_examples,
            **spec.task_sets.get(task, {})}


def score(config) -> dict:
    """Score test: `config` is a Config (a composition, built as is) or (checkpoint directory,
    overrides) (a trained module or router, loaded). Routing is counted over this evaluation only."""
    from ...core.accounting import account
    from ...core.recipe import Recipe

    recipe = Recipe(config) if not isinstance(config, tuple) else Recipe.from_checkpoint(*config)
    method = recipe.method
    if hasattr(method, "routing_counts"):
        method.routing_counts = [0, 0]
    t0 = time.perf_counter()
    scores = recipe.evaluate(recipe.test_examples, "test", sampler=False)
    metric = run_metric(recipe.config.task, recipe.config.generation.text_scores)
    out = {"metric": metric, "value": scores.get(f"test/{metric}"), "eval_s": time.perf_counter() - t0,
           "scores": {k: v for k, v in scores.items() if isinstance(v, (int, float))},
           "accounting": {k: v for k, v in account(method).items() if k != "per_module"}}
    if hasattr(method, "routing_accuracy"):
        out["routing_accuracy"] = method.routing_accuracy()
    return out


def composed_config(base_path: str, task: str, sets: dict, spec):
    """A composition's config: the first module's resolved config, as that method, on `task`."""
    data, _, _ = read_files(base_path)
    return config_lib.from_dict(data, {**eval_overrides(spec, task), **sets})


def plan(spec, paths: dict[int, dict], routers: dict[int, str]) -> list[tuple[str, object]]:
    """(record key, what to score) of every evaluation, in order: a checkpoint is scored as
    (directory, overrides), a composition as its config."""
    todo = []
    for seed in spec.seeds:
        mods = paths[seed]
        experts = [mods[(t, "trajectory")] for t in spec.tasks]
        loras = [mods[(t, "lora")] for t in spec.tasks]
        for a in spec.tasks:
            todo += [(f"module|trajectory:{a}|{seed}|{b}", (mods[(a, "trajectory")], eval_overrides(spec, b)))
                     for b in spec.tasks]
            todo.append((f"module|lora:{a}|{seed}|{a}", (mods[(a, "lora")], eval_overrides(spec, a))))
        for task in spec.tasks:
            if seed in routers:
                todo.append((f"composition|router-trained|{seed}|{task}", (routers[seed], eval_overrides(spec, task))))
            for mode in ("uniform", "oracle", "energy"):
                sets = {"method": "router", "router.checkpoints": experts, "router.mode": mode,
                        "router.energy_temperature": spec.energy_temperature}
                todo.append((f"composition|router-{mode}|{seed}|{task}", ("config", experts[0], task, sets)))
            for merge in ("linear", "cat", "ties"):
                sets = {"method": "lora_merge", "lora_merge.checkpoints": loras, "lora_merge.combination": merge}
                todo.append((f"composition|lora-{merge}|{seed}|{task}", ("config", loras[0], task, sets)))
    return todo


def evaluate_all(spec, record: Record, paths: dict[int, dict], routers: dict[int, str], log=print) -> None:
    todo = plan(spec, paths, routers)
    left = [(k, w) for k, w in todo if not record.has(k)]
    log(f"composition: {len(todo) - len(left)} of {len(todo)} evaluations recorded earlier, {len(left)} to run")
    for key, what in left:
        kind, name, seed, task = key.split("|")
        config = composed_config(*what[1:], spec=spec) if what[0] == "config" else what
        entry = {"kind": kind, "name": name, "seed": int(seed), "task": task, **score(config)}
        record.put(key, entry)
        log(f"composition: {name} seed {seed} on {task}: test/{entry['metric']} {entry['value']:.4f}"
            + (f", routing accuracy {entry['routing_accuracy']:.3f}" if "routing_accuracy" in entry else ""))
