"""Composition: the router's modes (trained, uniform, oracle, energy) over frozen task modules,
and PEFT's weighted merge of per-task weight-LoRA checkpoints (lora_merge)."""

import pytest
import torch

from lora_diffusion.core import checkpoint
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods.routing import MODES, energy_weights, expert_energies
from lora_diffusion.core.recipe import Recipe

TASKS = ("sst2", "ag_news")  # expert i is trained on TASKS[i] with trajectory.task_id i


def _train(tiny_config, tmp_path, name, **sets):
    config = tiny_config(**{"train.steps": 3, "train.lr": 0.05, **sets})
    recipe = Recipe(config)
    for _ in range(config.train.steps):
        recipe.train_step()
    return str(checkpoint.save(tmp_path / name, recipe.method, config, recipe.fingerprint, recipe.backbone.source))


@pytest.fixture
def experts(tiny_config, tmp_path):
    return [_train(tiny_config, tmp_path, f"traj-{task}", task=task, **{"trajectory.task_id": i, "train.seed": i})
            for i, task in enumerate(TASKS)]


def _router(tiny_config, experts, mode, task="sst2", **sets):
    return Recipe(tiny_config(method="router", task=task, **{"router.checkpoints": experts, "router.mode": mode,
                                                             **sets}))


def _logits(recipe, examples, t=0.5):
    batch = recipe.encode(examples)
    times = torch.full((batch.input_ids.shape[0],), t)
    return recipe.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, times)


@pytest.mark.parametrize("mode", MODES)
def test_router_weights_sum_to_one_in_every_mode(tiny_config, experts, mode):
    recipe = _router(tiny_config, experts, mode)
    if mode == "trained":  # away from the uniform start, so the check means something
        torch.nn.init.normal_(recipe.method.router.weight)
    _logits(recipe, recipe.validation_examples)
    w = recipe.method._weights
    assert w.shape == (len(recipe.validation_examples), 2) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(len(w)))


def test_a_one_hot_router_reproduces_the_single_task_module_exactly(tiny_config, experts):
    recipe = _router(tiny_config, experts, "trained")
    with torch.no_grad():
        recipe.method.router.bias.copy_(torch.tensor([0.0, 1e4]))  # softmax -> exactly (0, 1)
    single = Recipe.from_checkpoint(experts[1], {"task": "sst2"})
    rows = recipe.validation_examples
    composed = _logits(recipe, rows)
    assert torch.equal(recipe.method._weights, torch.tensor([[0.0, 1.0]] * len(rows)))
    assert torch.equal(composed, _logits(single, rows))


@pytest.mark.parametrize("task", TASKS)
def test_the_oracle_equals_the_single_task_module_on_its_task(tiny_config, experts, task):
    recipe = _router(tiny_config, experts, "oracle", task=task)
    single = Recipe.from_checkpoint(experts[TASKS.index(task)], {"task": task})
    rows = recipe.test_examples
    assert torch.equal(_logits(recipe, rows, t=0.9), _logits(single, rows, t=0.9))
    assert recipe.method.routing_accuracy() == 1.0
    # and its figures: evaluation stratifies t over the expert's phases, as the expert's own does
    assert recipe.method.phase_boundaries() == single.method.phase_boundaries() != [0.0, 1.0]
    assert recipe.evaluate(rows, "test", sampler=False) == single.evaluate(rows, "test", sampler=False)
    # and it is not the other task's module (the experts differ on these rows)
    other = Recipe.from_checkpoint(experts[1 - TASKS.index(task)], {"task": task})
    assert not torch.equal(_logits(recipe, rows, t=0.9), _logits(other, rows, t=0.9))


def test_energy_weights_are_the_softmax_of_the_stated_energies(tiny_config, experts):
    # the definition on hand-made perturbations: norms 5 and 0 on the prompt, 100 off it
    deltas = [torch.tensor([[[3.0, 4.0], [100.0, 0.0]]]), torch.zeros(1, 2, 2)]
    prompt = torch.tensor([[True, False]])
    assert torch.equal(expert_energies(deltas, prompt), torch.tensor([[5.0, 0.0]]))
    assert torch.allclose(energy_weights(deltas, prompt, 2.0), torch.softmax(torch.tensor([[2.5, 0.0]]), -1))
    # and the router's weights in a forward: E recomputed from the raw hidden state
    recipe = _router(tiny_config, experts, "energy", **{"router.energy_temperature": 0.5})
    method, layer = recipe.method, recipe.method.layers[0]
    seen = {}
    handle = recipe.backbone.layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach()), prepend=True)
    batch = recipe.encode(recipe.validation_examples)
    _logits(recipe, recipe.validation_examples, t=0.3)
    handle.remove()
    t = torch.full((len(batch.input_ids),), 0.3)
    energies = []
    for expert, edges in zip(method.experts, method.edges):
        delta = expert[f"layer{layer}"].delta(seen["h"], torch.bucketize(t, edges), None)
        norms = delta.norm(dim=-1)
        energies.append((norms * batch.prompt_mask).sum(1) / batch.prompt_mask.sum(1))
    expected = torch.softmax(torch.stack(energies, -1) / 0.5, -1)
    assert torch.allclose(method._weights, expected, atol=1e-6)


def test_training_free_modes_train_nothing_and_run_no_steps(tiny_config, experts):
    recipe = _router(tiny_config, experts, "uniform")
    assert recipe.method.trainable() == {} and recipe.optimizer is None
    result = recipe.run(log=None)
    assert result["steps"] == 0 and result["accounting"]["trainable_params"] == 0


def test_the_trained_router_learns_on_a_task_mixture(tiny_config, experts):
    recipe = _router(tiny_config, experts, "trained", task="ag_news",
                     **{"router.train_tasks": list(TASKS), "train.lr": 0.1, "train.steps": 3})
    tasks_seen = {e.id.split("/")[0] for e in recipe.train_examples}
    assert tasks_seen == set(TASKS)
    rows = [next(e for e in recipe.train_examples if e.id.startswith(t)) for t in TASKS]
    assert recipe.encode(rows).task_ids.tolist() == [0, 1]  # each row its own task's id
    result = recipe.run(log=None)  # trains on the mixture; train accuracy from the run's task's rows
    assert result["steps"] == recipe.config.train.steps and result["train/examples"] > 0
    assert recipe.method.routing_counts[1] > 0  # routing accuracy is counted


def test_the_oracle_refuses_experts_of_one_task_id(tiny_config, tmp_path, experts):
    twin = _train(tiny_config, tmp_path, "twin", task="sst2", **{"trajectory.task_id": 0})
    with pytest.raises(UserError, match="field router.checkpoints: the oracle needs one expert per task"):
        _router(tiny_config, [experts[0], twin], "oracle")


@pytest.fixture
def lora_experts(tiny_config, tmp_path):
    return [_train(tiny_config, tmp_path, f"lora-{task}", task=task, method="lora",
                   **{"lora.rank": 2, "train.seed": i}) for i, task in enumerate(TASKS)]


def _delta_weight(recipe, adapter_filter=None):
    """W - W0 of the first adapted linear, from the method's own LoRA tensors."""
    layer = next(m for n, m in recipe.backbone.model.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    return {name: layer.get_delta_weight(name) for name in layer.lora_A}


def test_lora_merge_cat_is_the_weighted_sum_of_the_task_updates(tiny_config, lora_experts):
    singles = [Recipe.from_checkpoint(p, {"task": "sst2"}) for p in lora_experts]
    expected = sum(0.5 * _delta_weight(r)["default"] for r in singles)
    merged = Recipe(tiny_config(method="lora_merge", **{"lora_merge.checkpoints": lora_experts,
                                                        "lora_merge.combination": "cat"}))
    assert list(_delta_weight(merged)) == ["merged"]  # the task adapters are gone
    assert torch.allclose(_delta_weight(merged)["merged"], expected, atol=1e-6)
    assert merged.method.trainable() == {}
    assert merged.method.state_to_save()  # the merged adapter is what is saved and counted


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_lora_merge_linear_and_ties_run_and_keep_the_rank(tiny_config, lora_experts, combination):
    merged = Recipe(tiny_config(method="lora_merge", **{"lora_merge.checkpoints": lora_experts,
                                                        "lora_merge.combination": combination}))
    single = Recipe.from_checkpoint(lora_experts[0], {"task": "sst2"})
    assert {k: v.shape for k, v in merged.method.state_to_save().items()} == \
        {k.replace(".default.", ".merged."): v.shape for k, v in single.method.state_to_save().items()}
    assert torch.isfinite(_logits(merged, merged.validation_examples)).all()


def test_lora_merge_refuses_unequal_ranks_for_linear(tiny_config, tmp_path, lora_experts):
    wide = _train(tiny_config, tmp_path, "wide", method="lora", **{"lora.rank": 4})
    with pytest.raises(UserError, match="field lora_merge.combination: linear needs equal ranks"):
        Recipe(tiny_config(method="lora_merge", **{"lora_merge.checkpoints": [lora_experts[0], wide]}))


def _record():
    """A hand-made record: 2 tasks, 2 seeds, the oracle and uniform routers, one module each."""
    evals = {}
    for seed, (own, other, oracle, uniform) in enumerate([(0.9, 0.5, 0.9, 0.7), (0.8, 0.4, 0.85, 0.6)]):
        for task in TASKS:
            for a in TASKS:
                value = own if a == task else other
                evals[f"module|trajectory:{a}|{seed}|{task}"] = {
                    "kind": "module", "name": f"trajectory:{a}", "seed": seed, "task": task, "value": value,
                    "eval_s": 2.0, "accounting": {"trainable_params": 100, "bytes_saved": 500}}
            for name, value, params in (("router-oracle", oracle, 0), ("router-uniform", uniform, 0),
                                        ("router-trained", uniform, 66)):
                evals[f"composition|{name}|{seed}|{task}"] = {
                    "kind": "composition", "name": name, "seed": seed, "task": task, "value": value,
                    "eval_s": 3.0 + seed * 2.0, "routing_accuracy": 0.75,
                    "accounting": {"trainable_params": params, "bytes_saved": 4 * params}}
    return {"name": "t", "tasks": list(TASKS), "seeds": [0, 1], "metrics": dict.fromkeys(TASKS, "accuracy"),
            "evaluations": evals}


def test_the_report_pairs_the_gap_to_the_oracle_by_seed_and_counts_what_composition_keeps(tmp_path):
    from lora_diffusion.experiments.composition import report as composition_report

    data = _record()
    matrix = composition_report.matrix_table(data).set_index("module (trained on)")
    assert matrix.loc["sst2", "sst2 accuracy"] == "0.850 ± 0.071"  # the diagonal: own task
    assert matrix.loc["sst2", "ag_news accuracy"] == "0.450 ± 0.071"  # interference
    table = composition_report.composition_table(data).set_index("composition")
    assert table.loc["router-uniform", "sst2 gap to oracle"] == "-0.225"  # (0.7 - 0.9 + 0.6 - 0.85) / 2
    assert table.loc["router-oracle", "sst2 gap to oracle"] == "+0.000"
    # a router keeps every task module (2 x 100) plus its own tensors; uniform adds nothing
    assert table.loc["router-trained", ["params added", "params at inference", "params per task"]].tolist() == \
        [66, 266, 133]
    assert table.loc["router-uniform", ["params added", "bytes at inference"]].tolist() == [0, 1000]
    assert table.loc["router-trained", "routing accuracy"] == "0.750"
    assert table.loc["router-oracle", "routing accuracy"] == "—"  # one-hot on the truth: not a measurement
    # evaluation seconds over the own module's on the same seed and task: (3/2 + 5/2) / 2
    assert table.loc["router-uniform", "eval time vs own module"] == "2.00x"
    assert table.loc["own trajectory module", "eval time vs own module"] == "1.00x"
    files = composition_report.write_files(data, tmp_path)
    assert {"heatmap_module__task", "heatmap_composition__task", "summary"} <= set(files)
    assert "## Interference matrix" in files["summary"].read_text()
    assert "sst2 accuracy (higher is better)" in files["summary"].read_text()


def test_an_elbo_only_engine_set_selects_generation_modules_on_the_lower_bound():
    """`--set generation.text_scores=false` reaches every trial over the grid's settings; the
    selection must then read the bound (lower is better), not a ROUGE column that was never made."""
    import pandas as pd

    from lora_diffusion.experiments.composition import stages as composition

    spec = composition.CompositionSpec(tasks=["sst2", "xsum"], seeds=[0], lrs={"trajectory": [1e-3, 5e-3],
                                                                              "lora": [1e-3]})
    assert spec.metric("xsum") == "rougeL"
    composition.apply_engine_sets(spec, ["generation.text_scores=false"])
    assert spec.metric("xsum") == "elbo_nats_per_token" and spec.metric("sst2") == "accuracy"
    rows = [("sst2", m, lr, "validation/accuracy", 0.6) for m, lr in
            [("trajectory", 1e-3), ("trajectory", 5e-3), ("lora", 1e-3)]]
    rows += [("xsum", "trajectory", 1e-3, "validation/elbo_nats_per_token", 5.0),
             ("xsum", "trajectory", 5e-3, "validation/elbo_nats_per_token", 4.0),
             ("xsum", "lora", 1e-3, "validation/elbo_nats_per_token", 4.5)]
    df = pd.DataFrame([{"task": t, "method": m, "train.lr": lr, "status": "FINISHED", "seed": 0,
                        "trial_id": f"{t}-{m}-{lr}", col: v} for t, m, lr, col, v in rows])
    df = df.rename(columns={c: composition.final_column(c.split("/")[0], c.split("/")[1])
                            for c in df.columns if "/" in c})
    chosen = composition.select_modules(spec, df)
    assert chosen[("xsum", "trajectory")]["lr"] == 5e-3  # the lower bound wins


@pytest.mark.slow
def test_the_composition_job_smoke_runs_end_to_end_and_resumes(synthetic_data_dir, tmp_path):
    """jobs/composition.py --smoke on Ray (a few minutes on 2 shared cores), then again: every
    stage and evaluation is read back, nothing runs twice."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "jobs/composition.py", "--smoke", "--address", "local", "--storage-path", str(storage),
           "--tracking-uri", uri, "--workdir", str(tmp_path / "work"), "--verbose", "0"]
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir)}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    record = json.loads((storage / "composition-smoke.composition.json").read_text())
    evals = record["evaluations"].values()
    assert record["tasks"] == ["sst2", "xquad"] and record["seeds"] == [0, 1]
    assert {e["name"] for e in evals if e["kind"] == "composition"} == {
        "router-trained", "router-uniform", "router-oracle", "router-energy", "lora-linear", "lora-cat", "lora-ties"}
    assert len(record["evaluations"]) == 2 * (2 * 2 + 2 + 7 * 2)  # seeds x (matrix + lora refs + compositions x tasks)
    for e in record["evaluations"].values():  # the oracle is its task's own module, end to end
        if e["name"] == "router-oracle":
            own = record["evaluations"][f"module|trajectory:{e['task']}|{e['seed']}|{e['task']}"]
            assert e["value"] == own["value"] and e["routing_accuracy"] == 1.0
    assert all(0 <= e["routing_accuracy"] <= 1 for e in evals if e["name"] == "router-trained")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    (parent,) = client.search_runs([exp.experiment_id],
                                   "tags.sweep = 'composition-smoke' and tags.stage = 'composition'")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "composition")}
    assert {"composition/summary.md", "composition/heatmap_module__task.png"} <= artifacts
    assert "Interference matrix" in parent.data.tags["mlflow.note.content"]

    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("finished earlier, skipped") == 3  # two module sweeps and the router's
    assert "40 of 40 evaluations recorded earlier, 0 to run" in again.stdout
