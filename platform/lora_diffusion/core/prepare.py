"""Turn an encoder into a masked diffusion LM: continued training with the diffusion objective.

all-MiniLM-L6-v2 ships without an MLM head (it loads with a seeded random head whose decoder is
tied to the input embeddings). Here the whole window is the "response" (nothing is held clean),
masked with probability t, and the model learns to denoise it with the 1/t-weighted ELBO, on the
raw text of the task corpora's train splits (prepare_corpus.py). `full` trains every weight,
`head` only the MLM head's transform and bias.

The result is cached by fingerprint: `<cache>/prepared/<backbone>-<mode>-<fingerprint>/`, a normal
Hugging Face directory that `backbone:` accepts, keyed by the source backbone's fingerprint and
every setting that changes the weights; a second identical call returns it without training.
It appears by one rename, so a directory there is always complete. Until then the run lives in
`<that>.work/`: a checkpoint (model, optimizer, step, RNG states) every `checkpoint_every` steps,
so rerunning the same command continues where it stopped and gives the weights an uninterrupted
run gives. `out`, if given, is a symlink to the cached directory: a stable name for configs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import diffusion
from .backbone import backbone_fingerprint, load_backbone
from .errors import UserError, check
from .prepare_corpus import CORPORA, first_windows, pack_windows, training_and_heldout_texts, window_batch
from .prepare_eval import completions, format_table, heldout_report

FORMAT = 2  # bump when the training procedure changes what the same settings produce
RESULT = "prepare_result.json"
STATE = "state.pt"


@dataclass(frozen=True)
class PrepareSettings:
    mode: str = "full"  # "full": every weight; "head": the MLM head only
    # the defaults are the run the README reports (so the plain command finds it in the cache)
    steps: int = 1200
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0  # seeds the random head, the data order, the masks and dropout
    backbone: str = "minilm"
    max_length: int = 64  # window length in tokens, [CLS] and [SEP] included
    corpora: tuple[str, ...] = CORPORA
    data_dir: str | None = None
    cache_dir: str | None = None  # default $LORA_DIFFUSION_CACHE, else ~/.cache/lora-diffusion
    out: str | None = None  # optional symlink to the cached result
    checkpoint_every: int = 100
    eval_texts: int = 200  # held-out texts, split evenly across the corpora
    threads: int | None = None  # torch intra-op threads; not part of the fingerprint


def check_settings(s: PrepareSettings) -> None:
    """Every UserError a setting can cause, before anything is loaded or written."""
    check(s.mode in ("full", "head"), "mode", f"{s.mode!r} is not full or head")
    for name in ("steps", "batch_size", "checkpoint_every", "eval_texts"):
        value = getattr(s, name)
        check(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
    check(s.lr > 0 and math.isfinite(s.lr), "lr", f"must be a positive number, got {s.lr!r}")
    check(isinstance(s.max_length, int) and 16 <= s.max_length <= 512, "max_length",
          f"must be an integer in [16, 512], got {s.max_length!r}")
    unknown = [c for c in s.corpora if c not in CORPORA]
    check(bool(s.corpora) and not unknown, "corpora",
          f"unknown {unknown or 'empty'} (valid: {', '.join(CORPORA)})")
    check(s.threads is None or s.threads >= 1, "threads", f"must be >= 1, got {s.threads!r}")
    if s.out and Path(s.out).exists() and not Path(s.out).is_symlink():
        raise UserError(f"out: {s.out} exists and is not a link to a prepared backbone; "
                        f"choose another --out")


def run_fingerprint(s: PrepareSettings, source_fingerprint: str) -> str:
    """Everything that changes the prepared weights, hashed."""
    keyed = {"format": FORMAT, "source": source_fingerprint, "mode": s.mode, "steps": s.steps,
             "lr": s.lr, "batch_size": s.batch_size, "max_length": s.max_length,
             "seed": s.seed, "corpora": sorted(s.corpora)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(s: PrepareSettings) -> Path:
    base = s.cache_dir or os.environ.get("LORA_DIFFUSION_CACHE") or Path.home() / ".cache" / "lora-diffusion"
    return Path(base) / "prepared"


def lr_at(step: int, s: PrepareSettings) -> float:
    """Linear warmup over the first 10% (at most 100 steps), then cosine decay to zero."""
    warmup = max(1, min(100, s.steps // 10))
    return s.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / s.steps))


def batch_rows(step: int, n: int, s: PrepareSettings) -> list[int]:
    """Window indices of a step's batch: a fresh seeded permutation of the windows each epoch,
    a pure function of (seed, step), so a resumed run reads what an uninterrupted one reads."""
    rows = []
    for pos in range(step * s.batch_size, (step + 1) * s.batch_size):
        epoch, i = divmod(pos, n)
        rows.append(_epoch_order(n, s.seed, epoch)[i])
    return rows


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _trainable(model, mode: str) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or not name.startswith(model.base_model_prefix + "."))
    return [p for p in model.parameters() if p.requires_grad]


def _save_state(work: Path, model, opt, step: int, gen: torch.Generator) -> None:
    tmp = work / f"{STATE}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, work / STATE)  # a crash mid-write leaves the previous checkpoint intact


def _load_state(work: Path, model, opt, gen: torch.Generator) -> int:
    """Restore the latest checkpoint, if any; returns the step to continue from."""
    path = work / STATE
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def _train_step(backbone, params, opt, batch, gen, lr: float) -> tuple[float, float]:
    backbone.model.train()
    for group in opt.param_groups:
        group["lr"] = lr
    loss, stats = diffusion.diffusion_loss(lambda ids, attn, sel, t: backbone.logits(ids, attn, sel, t),
                                           batch, backbone.mask_token_id, "linear", 1e-3, gen)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach()), stats["masked_accuracy"]


def train(backbone, windows, s: PrepareSettings, work: Path, log, stop_after: int | None) -> int:
    """Train from the latest checkpoint in `work` up to s.steps (or `stop_after` more steps);
    checkpoints every s.checkpoint_every steps and at the end. Returns the step reached."""
    from tqdm import tqdm

    params = _trainable(backbone.model, s.mode)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(s.seed)
    start = _load_state(work, backbone.model, opt, gen)
    end = s.steps if stop_after is None else min(s.steps, start + stop_after)
    if start and log:
        log(f"resuming from step {start} ({work / STATE})")
    recent, t0 = [], time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=s.steps, file=sys.stderr, mininterval=5,
               disable=log is None, desc=f"prepare {s.mode}")
    for step in bar:
        batch = window_batch(backbone.tokenizer, [windows[i] for i in batch_rows(step, len(windows), s)])
        recent.append(_train_step(backbone, params, opt, batch, gen, lr_at(step, s)))
        bar.set_postfix(loss=f"{recent[-1][0]:.2f}", acc=f"{recent[-1][1]:.3f}", refresh=False)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == end:
            _save_state(work, backbone.model, opt, step + 1, gen)
            if log:
                loss, acc = (sum(x) / len(recent) for x in zip(*recent))
                log(f"step {step + 1:6d}  loss {loss:.3f}  masked acc {acc:.3f}  "
                    f"{(time.perf_counter() - t0) / len(recent):.2f} s/step  (checkpoint saved)")
            recent, t0 = [], time.perf_counter()
    bar.close()
    return end


def load_source(s: PrepareSettings):
    """The backbone to prepare, with its random head seeded by s.seed (so it is reproducible
    and its fingerprint, part of the cache key, is stable)."""
    torch.manual_seed(s.seed)
    return load_backbone(s.backbone)


def _corpus_windows(backbone, s: PrepareSettings):
    """Training windows (packed, all corpora) and held-out windows (one per validation text)."""
    per_corpus = max(1, s.eval_texts // len(s.corpora))
    train_texts, heldout_texts = training_and_heldout_texts(s.corpora, s.data_dir, per_corpus, s.seed)
    tok = backbone.tokenizer
    train = [w for c in s.corpora for w in pack_windows(tok, train_texts[c], s.max_length)]
    heldout = {c: first_windows(tok, heldout_texts[c], s.max_length) for c in s.corpora}
    if not train:
        raise UserError(f"corpora: no training text in {', '.join(s.corpora)}")
    return train, heldout


def evaluate(backbone, heldout: dict, s: PrepareSettings) -> dict:
    """Held-out figures over all corpora together, and one completion sample per corpus."""
    windows = [w for c in s.corpora for w in heldout[c]]
    samples = [dict(corpus=c, **completions(backbone, heldout[c][:1], s.seed)[0])
               for c in s.corpora if heldout[c]]
    return {"heldout": heldout_report(backbone, windows, s.seed), "samples": samples}


def _link(out: str | None, target: Path) -> None:
    """Point the symlink `out` at target, replacing an older link in one rename."""
    if not out:
        return
    link = Path(out)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve())
    os.replace(tmp, link)


def _publish(backbone, result: dict, final: Path) -> None:
    """Write the prepared backbone next to `final` and move it there in one rename."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    backbone.tokenizer.save_pretrained(tmp)
    (tmp / RESULT).write_text(json.dumps(result, indent=2))
    if final.exists():  # another process finished the same run first: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


def prepare_backbone(s: PrepareSettings, log=print, stop_after: int | None = None,
                     eval_only: bool = False) -> dict:
    """Prepare (or fetch from the cache, or continue) the backbone `s` describes; returns its
    result (prepare_result.json). `stop_after` trains at most that many steps in this call and
    returns {"status": "partial"}; `eval_only` evaluates the latest checkpoint instead of training."""
    check_settings(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    backbone = load_source(s)
    source_fp = backbone_fingerprint(backbone)
    name = f"{Path(s.backbone).name}-{s.mode}"
    final = cache_root(s) / f"{name}-{run_fingerprint(s, source_fp)}"
    work = final.with_name(final.name + ".work")
    if (final / RESULT).is_file() and not eval_only:
        result = json.loads((final / RESULT).read_text()) | {"cached": True, "out": str(final)}
        _link(s.out, final)
        return result
    train_windows, heldout = _corpus_windows(backbone, s)
    if eval_only:
        return evaluate_checkpoint(backbone, heldout, s, final, work, log)
    work.mkdir(parents=True, exist_ok=True)
    before = _before(backbone, heldout, s, work, log)
    t0 = time.perf_counter()
    reached = train(backbone, train_windows, s, work, log, stop_after)
    if reached < s.steps:
        return {"status": "partial", "step": reached, "steps": s.steps, "work": str(work)}
    train_time = time.perf_counter() - t0
    after = evaluate(backbone, heldout, s)
    result = {"status": "done", "out": str(final), "settings": _settings_dict(s),
              "source_fingerprint": source_fp, "train_windows": len(train_windows),
              "train_tokens": sum(len(w) for w in train_windows),
              "heldout_windows": {c: len(heldout[c]) for c in s.corpora},
              "heldout_note": "validation splits of " + ", ".join(s.corpora) + ": first window of "
                              "each text, never trained on (train splits only are trained on)",
              "before": before, "after": after, "last_session_train_time_s": train_time}
    _publish(backbone, result, final)
    shutil.rmtree(work, ignore_errors=True)
    _link(s.out, final)
    if log:
        log(format_table(before["heldout"], after["heldout"]))
    return result


def _settings_dict(s: PrepareSettings) -> dict:
    return {k: v for k, v in asdict(s).items() if k not in ("cache_dir", "out", "threads")}


def _before(backbone, heldout, s: PrepareSettings, work: Path, log) -> dict:
    """The raw backbone's figures, measured once per run (kept in `work` across resumes)."""
    path = work / "before.json"
    if path.is_file():
        return json.loads(path.read_text())
    before = evaluate(backbone, heldout, s)
    path.write_text(json.dumps(before, indent=2))
    if log:
        log(format_table(before["heldout"], None))
    return before


def evaluate_checkpoint(backbone, heldout, s: PrepareSettings, final: Path, work: Path, log) -> dict:
    """Figures of the finished backbone, or else of the latest checkpoint of an unfinished run
    (written to `<work>/eval_step<N>.json`, labelled with its step)."""
    if (final / RESULT).is_file():
        backbone = load_backbone(str(final))
        step, where = s.steps, final
    else:
        step = _load_state(work, backbone.model, None, torch.Generator())
        where = work
        if step == 0:
            raise UserError(f"eval_only: no checkpoint of this run yet in {work}")
    result = {"status": "checkpoint" if where == work else "done", "step": step, "steps": s.steps,
              "before": json.loads((work / "before.json").read_text()) if (work / "before.json").is_file() else None,
              "after": evaluate(backbone, heldout, s)}
    if where == work:
        (work / f"eval_step{step}.json").write_text(json.dumps(result, indent=2))
    if log:
        log(format_table((result["before"] or result["after"])["heldout"], result["after"]["heldout"]))
    return result
