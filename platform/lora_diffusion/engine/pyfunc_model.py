"""The MLflow model of an exported checkpoint, logged as MLflow "models from code".

MLflow copies this file into the logged model and runs it on `mlflow.pyfunc.load_model`, so it
imports nothing of this package at module level. Its one artifact, `model`, is a
core/export.py export, and its export.json says which:

- merged (weight-space methods, full fine-tuning): loaded by the family's transformers Auto
  class alone (remote-code families with their code files): no lora_diffusion needed;
- native (methods whose update depends on t): loaded by `lora_diffusion.load`, which must be
  installed where the model is loaded.

`predict({"input_ids": [[...]], "attention_mask": [[...]], "t": [...]})` returns the logits at
every position, [B, S, V] float32, the platform's forward at diffusion time t (a merged model's
logits do not depend on t, except through the forward of a family that takes the time, MDLM).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np


def _as_arrays(model_input):
    """input_ids, attention_mask, t from a dict (or a one-row DataFrame) of lists or arrays."""
    if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a DataFrame
        model_input = {k: list(v) for k, v in model_input.to_dict(orient="list").items()}
    ids = np.asarray(model_input["input_ids"], dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    attn = np.asarray(model_input.get("attention_mask", np.ones_like(ids)), dtype=np.int64).reshape(ids.shape)
    t = np.broadcast_to(np.asarray(model_input.get("t", 0.0), dtype=np.float32).reshape(-1), (ids.shape[0],))
    return ids, attn, t


class ExportedDenoiser(mlflow.pyfunc.PythonModel):
    """Logits at a given t and attention mask, from a merged or native export."""

    def load_context(self, context):
        directory = Path(context.artifacts["model"])
        self.info = json.loads((directory / "export.json").read_text())
        if self.info["format"] == "native":
            import lora_diffusion

            self.native = lora_diffusion.load(directory)
            return
        import transformers

        self.native = None
        cls = getattr(transformers, self.info["auto_class"])
        self.model = cls.from_pretrained(str(directory), trust_remote_code=self.info["trust_remote_code"],
                                         local_files_only=True).eval()

    def predict(self, context, model_input, params=None):
        import torch

        ids, attn, t = (torch.tensor(a) for a in _as_arrays(model_input))
        if self.native is not None:
            return self.native.logits(ids, attn, t).numpy()
        info, kwargs = self.info, {"input_ids": ids}
        if info["attention_mask"] == "2d":
            kwargs["attention_mask"] = attn
        elif info["attention_mask"] == "4d":
            kwargs["attention_mask"] = attn.bool()[:, None, None, :]
        if info["time_argument"]:  # MDLM takes sigma(t) of its log-linear schedule (core/families.py)
            kwargs[info["time_argument"]] = -torch.log1p(-(1 - 1e-3) * t) if info["time_as_sigma"] else t
        with torch.no_grad():
            out = self.model(**kwargs)
        logits = out.logits if getattr(out, "logits", None) is not None else out[0]
        if info["shifted"]:  # Dream: the output at i - 1 predicts token i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits.float().numpy()


mlflow.models.set_model(ExportedDenoiser())
