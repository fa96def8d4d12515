"""`lora-diffusion export`: a checkpoint, or a sweep's selected configuration as retrained, taken out
as a PEFT adapter, merged Hugging Face weights or the native format (core/export.py).

    lora-diffusion export --checkpoint runs/train --format peft --out exported/
    lora-diffusion export --sweep my-sweep --format merged --out exported/     # the retrain's best seed
    lora-diffusion export --sweep my-sweep --seed 4 --format native --out exported/

`--sweep NAME` reads the sweep's retrain stage, `NAME-retrain` (experiments/retrain.py): its trials
from MLflow, the seed named (default: the best on validation, the seed whose model the stage logs),
and that trial's last Train checkpoint in the sweeps' storage, `NAME-retrain/train/TRIAL_ID/
checkpoint_*` (engine/trial.py; copied here first from an object store).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile

from ..core import export as export_lib
from ..core.errors import UserError


def selected_trial(tracking_uri: str, stage: str, seed: int | None = None) -> dict:
    """The stage's FINISHED trial of `seed`, else its best on validation (the task's metric, in
    its direction): its row (trial_id, run_id, seed, ...)."""
    from ..analysis.trials import final_column, load_trials, task_metric
    from ..core.task_specs import metric_mode

    df = load_trials(tracking_uri, stage)
    done = df[df["status"] == "FINISHED"] if len(df) else df
    if not len(done):
        raise UserError(f"--sweep: the retrain stage {stage} has no finished trial")
    if seed is not None:
        rows = done[done["seed"] == seed]
        if not len(rows):
            raise UserError(f"--seed: {seed} is not a finished seed of {stage} "
                            f"(seeds {sorted(int(s) for s in done['seed'])})")
        return rows.iloc[0].to_dict()
    metric = task_metric(done)
    column = final_column("validation", metric)
    sign = 1 if metric_mode(f"validation/{metric}") == "max" else -1
    scores = [sign * float(v) if not math.isnan(float(v)) else -math.inf for v in done[column]]
    return done.iloc[max(range(len(scores)), key=scores.__getitem__)].to_dict()


def trial_checkpoint(storage, stage: str, trial_id: str) -> tuple[str, int]:
    """(storage path, step) of the trial's Train checkpoint with the most steps."""
    base = f"{stage}/train/{trial_id}"
    found = []
    for name in storage.names(base):
        state = f"{base}/{name}/trainer_state.json"
        if name.startswith("checkpoint_") and storage.exists(state):
            found.append((int(json.loads(storage.read_text(state))["step"]), name))
    if not found:
        raise UserError(f"--sweep: no checkpoint of trial {trial_id} in {storage.join(base)}")
    step, name = max(found)
    return f"{base}/{name}", step


@contextlib.contextmanager
def selected_checkpoint(storage, tracking_uri: str, stage: str, seed: int | None = None, fmt: str | None = None):
    """(local checkpoint directory, trial row, step) of the stage's selected seed, while inside;
    a `fmt` its method (the trial's tag) does not have is refused before anything is copied."""
    row = selected_trial(tracking_uri, stage, seed)
    if fmt is not None and isinstance(row.get("method"), str):
        export_lib.check_format(row["method"], fmt)
    rel, step = trial_checkpoint(storage, stage, row["trial_id"])
    with tempfile.TemporaryDirectory(prefix="lora-diffusion-checkpoint-") as scratch:
        yield storage.local_copy(rel, scratch), row, step


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint directory (train's output, a sweep trial's)")
    source.add_argument("--sweep", help="a sweep's name: its retrain stage's checkpoint (NAME-retrain)")
    p.add_argument("--seed", type=int, help="with --sweep: this seed's retrained checkpoint "
                                            "(default: the best on validation)")
    p.add_argument("--format", required=True, help="peft | merged | native (which a method has: "
                                                   "the refusal lists them)")
    p.add_argument("--out", required=True, help="the directory written (complete, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--storage-path", help="where sweeps live (default: $LORA_DIFFUSION_STORAGE, else runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, from its sweep.json)")
    return p


def _sweep_tracking_uri(storage, name: str, given: str | None) -> str:
    from ..engine.options import default_tracking_uri
    from ..engine.spec import SPEC_FILE

    if given:
        return given
    if storage.exists(f"{name}/{SPEC_FILE}"):
        return json.loads(storage.read_kept(f"{name}/{SPEC_FILE}"))["tracking_uri"]
    return default_tracking_uri()


def main(argv: list[str] | None = None, prog: str = "lora-diffusion export") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.checkpoint:
        if args.seed is not None:
            raise UserError("--seed: only with --sweep (a checkpoint directory is one seed)")
        out = export_lib.export(args.checkpoint, args.format, args.out, args.overwrite)
        print(f"{args.format} export of {args.checkpoint} in {out}")
        return 0
    from ..engine import options
    from ..engine.storage import SweepStorage

    storage = SweepStorage(options.storage_location(args.storage_path))
    stage = f"{args.sweep}-retrain"
    if not storage.exists(f"{stage}/train"):
        raise UserError(f"--sweep: {args.sweep} has no retrain stage with checkpoints ({storage.join(stage, 'train')})")
    uri = _sweep_tracking_uri(storage, args.sweep, args.tracking_uri)
    with selected_checkpoint(storage, uri, stage, args.seed, args.format) as (path, row, step):
        out = export_lib.export(path, args.format, args.out, args.overwrite)
    print(f"{args.format} export of {args.sweep}'s retrained seed {int(row['seed'])} (trial {row['trial_id']}, "
          f"step {step}) in {out}")
    return 0
