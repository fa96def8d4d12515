"""Taking the model out (core/export.py, core/loader.py, engine/model_registry.py, experiments/export.py).

On the tiny random BERT, each method trained a few steps at a large rate (so its update is far
from zero). An exported model loaded by PEFT or transformers alone, in a subprocess that never
imports lora_diffusion, gives the platform's own logits at a fixed t and mask: within 1e-6 for
a PEFT adapter (the same operations; measured 0) and 1e-5 for merged weights (W + s B A rounded
once into W in fp32; measured <= 2e-7), and each differs from the bare backbone's by more than
ten times that (the update is in it); the native loader gives exactly the recipe's. The registered
MLflow model loads from a local sqlite store and gives the same logits. Refused combinations are
one line naming the method and its formats, and write nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_diffusion.core import checkpoint, config as config_lib, export

# fp32 logits of magnitude ~10 from another process (its own thread count, so its own summation
# order): 1e-5 is a relative 1e-6; seen 6.7e-6 on a loaded 2-core CI machine for the headless case
PEFT_TOL, MERGED_TOL = 1e-5, 1e-5
LARGER_RATE = {"adalora": {"train.lr": 5e-2}}
T = 0.7  # the diffusion time the platform's forward is told (weight-space methods ignore it)


@pytest.fixture(scope="module")
def trained(tiny_backbone_dir, synthetic_data_dir, tmp_path_factory):
    """method -> a checkpoint directory of it, trained 3 steps at lr 1e-2 (AdaLoRA 5e-2: its update
    is P E Q with E starting at zero), built on first use."""
    root, made = tmp_path_factory.mktemp("export-ckpts"), {}

    def make(method: str, name: str | None = None, **sets) -> Path:
        name = name or method
        if name not in made:
            from lora_diffusion.core.recipe import Recipe

            config = config_lib.from_dict({}, {
                "backbone": str(tiny_backbone_dir), "data_dir": str(synthetic_data_dir), "method": method,
                "max_length": 32, "max_train_examples": 64, "max_eval_examples": 8, "train_accuracy_examples": 8,
                "train.steps": 4, "train.batch_size": 8, "train.eval_every": 4, "train.warmup_steps": 1,
                "train.lr": 1e-2, "trajectory.injection_layers": [0], "trajectory.num_phases": 2,
                "gelora.samples": 32, "diffusion.eval_t_points": 1, **LARGER_RATE.get(method, {}), **sets})
            recipe = Recipe(config)
            for _ in range(3):
                recipe.train_step()
            made[name] = checkpoint.save(root / name, recipe.method, config, recipe.fingerprint,
                                         recipe.backbone.source)
        return made[name]
    return make


@pytest.fixture(scope="module")
def inputs(tiny_backbone_dir):
    """Two rows, the second padded, masked tokens in each (ids [2, S], attention mask [2, S])."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone_dir))
    enc = tok(["a moving and charming film", "dull"], padding=True, return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[0, 2], ids[0, 4], ids[1, 1] = tok.mask_token_id, tok.mask_token_id, tok.mask_token_id
    return ids, enc["attention_mask"]


def platform_logits(directory, ids, attn, t=T) -> np.ndarray:
    import lora_diffusion

    return lora_diffusion.load(directory).logits(ids, attn, t).numpy()


# What a user's harness runs: transformers and PEFT, never this package.
OUTSIDE = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
from safetensors import safe_open
from transformers import AutoModelForMaskedLM
from peft import PeftModel

jobs, ids, attn = json.loads(sys.argv[1]), torch.tensor(np.load(sys.argv[2])), torch.tensor(np.load(sys.argv[3]))
for job in jobs:
    d = Path(job["dir"])
    if job["kind"] == "peft":
        base = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(str(d / base)), str(d))
        with tempfile.TemporaryDirectory() as own:  # PEFT's own save of what it loaded: the same names
            model.save_pretrained(own)
            with safe_open(f"{own}/adapter_model.safetensors", "pt") as a, \
                 safe_open(str(d / "adapter_model.safetensors"), "pt") as b:
                assert sorted(a.keys()) == sorted(b.keys()), (sorted(a.keys())[:3], sorted(b.keys())[:3])
    else:  # merged, or the bare backbone
        model = AutoModelForMaskedLM.from_pretrained(str(d))
    with torch.no_grad():
        np.save(job["out"], model.eval()(input_ids=ids, attention_mask=attn).logits.numpy())
assert not [m for m in sys.modules if m.startswith("lora_diffusion")], "imported lora_diffusion"
"""


def run_outside(script: str, args: list[str], cwd: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no PYTHONPATH to the package
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_peft_and_merged_exports_load_without_the_package_and_give_the_platform_logits(
        trained, inputs, tiny_backbone_dir, tmp_path):
    ids, attn = inputs
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "attn.npy", attn.numpy())
    jobs, expected = [{"kind": "base", "dir": str(tiny_backbone_dir), "out": str(tmp_path / "base.npy")}], {}
    for method in ("lora", "dora", "adalora", "vera", "gelora", "full", "bitfit"):
        expected[method] = platform_logits(trained(method), ids, attn)
        for fmt in ("peft", "merged"):
            if fmt in export.formats_of(method):
                out = export.export(trained(method), fmt, tmp_path / f"{method}-{fmt}")
                jobs.append({"kind": fmt, "dir": str(out), "out": str(tmp_path / f"{method}-{fmt}.npy"),
                             "method": method})
    run_outside(OUTSIDE, [json.dumps(jobs), str(tmp_path / "ids.npy"), str(tmp_path / "attn.npy")], tmp_path)
    base, real = np.load(tmp_path / "base.npy"), attn.bool().numpy()
    assert len(jobs) == 1 + 5 * 2 + 2
    for job in jobs[1:]:
        got, want = np.load(job["out"])[real], expected[job["method"]][real]
        tol = PEFT_TOL if job["kind"] == "peft" else MERGED_TOL
        assert np.abs(got - want).max() <= tol, (job["method"], job["kind"], np.abs(got - want).max())
        assert np.abs(want - base[real]).max() > 10 * tol, f"{job['method']}: the update is ~0, nothing tested"


def test_peft_export_of_a_headless_encoder_carries_the_seeded_head(synthetic_data_dir, inputs, tmp_path):
    """MiniLM has no MLM head on disk (the platform seeds one): the adapter's base model, head
    included, is written beside it, and PEFT's config names it; PEFT alone then gives the
    platform's logits."""
    from lora_diffusion.core import precision
    from lora_diffusion.core.backbone import backbone_fingerprint, load_backbone
    from lora_diffusion.core.step import attach

    config = config_lib.from_dict({}, {"backbone": "minilm", "data_dir": str(synthetic_data_dir), "method": "lora"})
    torch.manual_seed(config.backbone_seed)
    backbone = load_backbone("minilm")
    fingerprint = backbone_fingerprint(backbone)
    method = attach(config, backbone, precision.resolve("fp32", torch.device("cpu")), torch.device("cpu"))
    with torch.no_grad():  # a trained-looking update: B away from its zero start
        for name, p in method.trainable().items():
            p.normal_(0, 0.05) if "lora_B" in name else None
    ckpt = checkpoint.save(tmp_path / "ckpt", method, config, fingerprint, backbone.source)
    out = export.export(ckpt, "peft", tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == export.BASE_MODEL_DIR
    ids, attn = inputs
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "attn.npy", attn.numpy())
    job = {"kind": "peft", "dir": str(out), "out": str(tmp_path / "got.npy")}
    run_outside(OUTSIDE, [json.dumps([job]), str(tmp_path / "ids.npy"), str(tmp_path / "attn.npy")], tmp_path)
    real = attn.bool().numpy()
    diff = np.abs(np.load(job["out"])[real] - platform_logits(ckpt, ids, attn)[real]).max()
    assert diff <= PEFT_TOL, diff


def test_native_export_round_trips_through_the_loader(trained, inputs, tmp_path):
    """The loader on a native export gives the recipe's own forward at several t, and generates."""
    import lora_diffusion
    from lora_diffusion.core.recipe import Recipe

    ids, attn = inputs
    select = attn.bool()
    for method in ("trajectory", "tlora", "nara"):
        out = export.export(trained(method), "native", tmp_path / method)
        assert json.loads((out / export.EXPORT_FILE).read_text())["formats"] == ["native"]
        loaded, recipe = lora_diffusion.load(out), Recipe.from_checkpoint(trained(method))
        for t in (0.2, 0.9):
            want = recipe.denoise(ids, attn, select, torch.full((2,), t))
            got = loaded.logits(ids, attn, t, select=select)
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
        texts = loaded.generate(["the film was", "a dull story"], response_tokens=3, steps=3)
        assert len(texts) == 2 and all(isinstance(x, str) for x in texts)


def test_native_router_export_carries_its_experts(trained, inputs, tmp_path):
    """A router's experts are copied into the export: it loads after the originals are gone."""
    import lora_diffusion

    experts = [shutil.copytree(trained("trajectory"), tmp_path / f"expert{k}") for k in range(2)]
    router = trained("router", name="router-export", **{"router.checkpoints": [str(p) for p in experts]})
    ids, attn = inputs
    want = platform_logits(router, ids, attn)
    out = export.export(router, "native", tmp_path / "router")
    for p in experts:
        shutil.rmtree(p)
    assert json.loads((out / "config.json").read_text())["router"]["checkpoints"] == ["experts/0", "experts/1"]
    np.testing.assert_array_equal(lora_diffusion.load(out).logits(ids, attn, T).numpy(), want)


@pytest.mark.parametrize("method,fmt,formats", [("trajectory", "peft", "native"), ("trajectory", "merged", "native"),
                                                ("full", "peft", "merged, native"), ("lora", "onnx", None)])
def test_a_refused_combination_is_one_line_naming_the_method_and_its_formats(
        trained, tmp_path, capsys, method, fmt, formats):
    from lora_diffusion import cli

    out = tmp_path / "out"
    rc = cli.main(["export", "--checkpoint", str(trained(method)), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert (f"method {method}" in err[0] and f"its formats: {formats}" in err[0]) if formats else "onnx" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_failed_export_leaves_nothing_at_out(trained, tmp_path, monkeypatch):
    def broken(checkpoint, directory):
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_native", broken)
    with pytest.raises(RuntimeError):
        export.export(trained("trajectory"), "native", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# The MLflow model's code (engine/pyfunc_model.py) run as MLflow runs it: a file, not this package.
WRAPPER = r"""
import runpy, sys, types
import numpy as np
ns = runpy.run_path(sys.argv[1])
model = ns["ExportedDenoiser"]()
model.load_context(types.SimpleNamespace(artifacts={"model": sys.argv[2]}))
inputs = {"input_ids": np.load(sys.argv[3]), "attention_mask": np.load(sys.argv[4]), "t": [float(sys.argv[5])]}
np.save(sys.argv[6], model.predict(None, inputs))
assert not [m for m in sys.modules if m.startswith("lora_diffusion")], "imported lora_diffusion"
"""


@pytest.mark.parametrize("family", ["llada", "dream", "mdlm"])
def test_merged_remote_code_family_loads_with_its_own_code_alone(family, synthetic_data_dir, tmp_path):
    """LLaDA, Dream and MDLM merged: their code files beside the weights, loaded by AutoModel with
    trust_remote_code, called as export.json says (Dream's shift, MDLM's time): the platform's logits."""
    from lora_diffusion.core.backbone import backbone_fingerprint, load_backbone
    from lora_diffusion.core.step import attach
    from lora_diffusion.engine import model_registry
    from support import tiny_families

    source = tiny_families.build(family, tmp_path / family)
    config = config_lib.from_dict({}, {"backbone": str(source), "trust_remote_code": True, "method": "lora",
                                       "data_dir": str(synthetic_data_dir), "max_length": 24})
    torch.manual_seed(config.backbone_seed)
    backbone = load_backbone(str(source), trust_remote_code=True)
    fingerprint = backbone_fingerprint(backbone)
    method = attach(config, backbone, "fp32", torch.device("cpu"))
    with torch.no_grad():
        for name, p in method.trainable().items():
            p.normal_(0, 0.2) if "lora_B" in name else None
    ckpt = checkpoint.save(tmp_path / "ckpt", method, config, fingerprint, backbone.source)
    out = export.export(ckpt, "merged", tmp_path / "merged")
    assert list(out.glob("modeling_*.py"))
    ids, attn = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "attn.npy", attn.numpy())
    run_outside(WRAPPER, [str(model_registry.CODE), str(out), str(tmp_path / "ids.npy"), str(tmp_path / "attn.npy"),
                          str(T), str(tmp_path / "got.npy")], tmp_path)
    diff = np.abs(np.load(tmp_path / "got.npy") - platform_logits(ckpt, ids, attn)).max()
    assert diff <= MERGED_TOL, diff
