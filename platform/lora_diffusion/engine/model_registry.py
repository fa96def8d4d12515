"""A checkpoint as an MLflow 3 logged model, linked to its run, and registered by name on request.

The checkpoint is exported (core/export.py) as merged weights where the method has them (they
load with transformers alone), else in the native format (`lora_diffusion.load`), and logged as
the pyfunc model of engine/pyfunc_model.py ("models from code": no pickle) with the export as
its artifact. It is logged under the run that trained it, at the step of the run's final
metrics, so MLflow links the model to that run and to those metrics; with `register_as` it
becomes a version of that registered model.

    info = log_checkpoint_model("sqlite:///runs/mlflow.db", run_id, "ckpt/", step=300, register_as="my-sweep")
    mlflow.pyfunc.load_model("models:/my-sweep/1").predict({"input_ids": ..., "attention_mask": ..., "t": [0.5]})
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

CODE = Path(__file__).with_name("pyfunc_model.py")


def _requirements(fmt: str) -> list[str]:
    """What loading the model needs, pinned to the versions it was logged with."""
    names = ["mlflow", "numpy", "torch", "transformers", "safetensors"] + (["peft"] if fmt == "native" else [])
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins + (["lora-diffusion"] if fmt == "native" else [])


@contextlib.contextmanager
def _tracking(uri: str):
    """mlflow's fluent API pointed at `uri` while inside, as it was after."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


def log_checkpoint_model(tracking_uri: str, run_id: str, checkpoint: str | Path, step: int = 0,
                         register_as: str | None = None) -> dict:
    """Log `checkpoint` as a model of run `run_id` (linked to its metrics at `step`); register it
    as `register_as` if given. Returns model_id, model_uri, format, registered name and version."""
    from ..core import export

    method = export.method_of(checkpoint)
    fmt = "merged" if "merged" in export.formats_of(method) else "native"
    with tempfile.TemporaryDirectory(prefix="lora-diffusion-model-") as tmp, _tracking(tracking_uri) as mlflow:
        out = export.export(checkpoint, fmt, Path(tmp) / "model")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow asks for type hints on predict; its input is a plain dict of arrays
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(CODE), artifacts={"model": str(out)},
                pip_requirements=_requirements(fmt), registered_model_name=register_as, step=step,
                tags={"method": method, "format": fmt}, metadata={"method": method, "format": fmt})
    return {"model_id": info.model_id, "model_uri": info.model_uri, "format": fmt, "method": method,
            "registered_name": register_as, "registered_version": info.registered_model_version}


def register(tracking_uri: str, model_uri: str, name: str) -> int:
    """Register an already logged model (`models:/<model_id>`) as a version of `name`."""
    with _tracking(tracking_uri) as mlflow:
        return int(mlflow.register_model(model_uri, name).version)
