"""The soak: one sweep whose driver is killed again and again, resumed each time, then its fault matrix.

    lora-diffusion soak --kills 10                     # the default sweep: a smoke grid, 8 trials
    lora-diffusion soak --kills 3 -- jobs/rank_schedule_sweep.py --smoke --num-samples 6

The sweep's job runs as a driver in a process session of its own, with a local Ray (as on a
preemptible machine: the driver, Ray and the trials go down together). Faults, in order:

- `driver SIGKILL` (--kills N): once the driver's trials have reported something new since it
  started (so every start makes progress), after a seeded random delay (0 to --max-delay s),
  SIGKILL to its process group, then to whatever of its session is left; resumed with --resume;
- `driver SIGINT (Ctrl-C)` (--interrupts M): once every trial has started and one of the last is
  midway: Tune stops the running trials, and the driver must say it was interrupted (exit 1, no
  ablation report); resumed with --resume;
- `Train worker killed` (--kill-worker RANK:STEP): that worker of the first trial to get there
  exits (tests/support/faults' hook, on the sweep's PYTHONPATH); its worker group restarts from
  the last checkpoint.

The last start runs the sweep to its end; then `fault_matrix` reads the Tune state and the MLflow
store. The soak imports no Ray: it only starts and kills processes and reads files and MLflow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis import fault_matrix as fm
from ..engine.tuner import RAY_START_TIMEOUT

SIGKILL_FAULT, SIGINT_FAULT, WORKER_FAULT = "driver SIGKILL", "driver SIGINT (Ctrl-C)", "Train worker killed"
DEFAULT_JOB = ["jobs/ablation_grid.py", "--smoke", "--retrain-seeds", "0", "--max-concurrent", "2", "--verbose", "0",
               "--set", "train.steps=300", "--set", "train.eval_every=10"]  # long enough for 10 kills
POLL_S = 0.3
# Ray's local node start waits 30 s for the raylet (hard-coded in ray/_private/node.py) and fails
# on a loaded machine. That is not a fault of the sweep (nothing has started: engine/sweep.py);
# the driver itself tries 3 times (tuner.init_ray), and should all fail the soak starts the driver
# again, up to MAX_START_RETRIES times, and counts the restarts.
MAX_START_RETRIES = 3


@dataclass
class SoakPlan:
    job: list[str]  # the sweep's job and its options, without --name / --storage-path / --tracking-uri
    name: str
    storage: Path
    tracking_uri: str
    kills: int = 10
    interrupts: int = 0
    seed: int = 0
    max_delay: float = 10.0
    start_timeout: float = 900.0  # one start's wait for its next report, or for its end
    log_dir: Path | None = None
    env: dict = field(default_factory=dict)  # the driver's environment on top of this process's
    kill_worker: str | None = None  # "RANK:STEP": that Train worker exits there, once (tests/support/faults)
    kill_when: Callable[[dict], bool] | None = None  # a kill's moment by the sweep's `snapshot`, not at random
    after_fault: Callable[[dict], None] | None = None  # called with each injection, before the resume
    injections: list[dict] = field(default_factory=list)
    seen: dict = field(default_factory=dict)  # trial id -> every report seen (see `observe`)
    start_retries: int = 0  # starts that died in Ray's own node start, and were started again

    @property
    def exp_dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def worker_marker(self) -> Path:
        return Path(self.storage) / f"{self.name}.worker-died"

    def command(self, resume: bool) -> list[str]:
        return [sys.executable, *self.job, "--name", self.name, "--storage-path", str(self.storage),
                "--tracking-uri", self.tracking_uri, "--address", "local", *(["--resume"] if resume else [])]


# ----------------------------------------------------------------------------- processes


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session `sid` (the driver's: Ray and the trials), then wait for them."""
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                p.kill()
                procs.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    psutil.wait_procs(procs, timeout=30)


def start_driver(plan: SoakPlan, resume: bool, n: int) -> tuple[subprocess.Popen, Path]:
    """The sweep's driver in a session of its own (its pid is the session's id), output to a log."""
    log = Path(plan.log_dir or plan.storage) / f"{plan.name}-start{n}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **plan.env}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, killed with the driver
    if plan.kill_worker:  # the test suite's fault hook, which Ray's workers inherit through PYTHONPATH
        hook = _repo() / "tests" / "support" / "faults"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
        env["LORA_DIFFUSION_TEST_KILL_WORKER"] = f"{plan.kill_worker}:{plan.worker_marker}"
    with open(log, "w") as f:
        proc = subprocess.Popen(plan.command(resume), cwd=_repo(), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def _repo() -> Path:
    from ..engine.options import repo_root

    return repo_root()


# ----------------------------------------------------------------------------- the sweep's state


def observe(plan: SoakPlan) -> dict[str, list[dict]]:
    """The trials' reports now, added to those seen before: a resumed driver starts a restarted
    trial's result.json afresh (its staging directory is new) and its sync overwrites the stored
    one, so a trial's earlier reports live on only here."""
    results = fm.trial_results(plan.exp_dir)
    for tid, rows in results.items():
        seen = plan.seen.setdefault(tid, {"rows": set(), "reported": set(), "finals": set(), "resumed": set()})
        seen["rows"] |= {r.get("timestamp") for r in rows}
        seen["resumed"] |= {r.get("resumed_from_step") for r in rows}
        seen["reported"] |= fm.reported(rows)
        seen["finals"] |= {r.get("timestamp") for r in rows if "result_json" in r}
    return results


def _reports(plan: SoakPlan) -> int:
    """Reports seen so far (grows with every new one, whatever a resume rewrites)."""
    observe(plan)
    return sum(len(seen["rows"]) for seen in plan.seen.values())


def _expected(exp_dir: Path) -> int | None:
    """The sweep's trial count, from its saved spec (a grid's cells x seeds, or --num-samples)."""
    try:
        return int(json.loads((exp_dir / "sweep.json").read_text())["sweep"]["num_samples"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def snapshot(plan: SoakPlan) -> dict:
    """What a fault touches: the trials not yet ended, those midway (reported, no final: id -> last
    step) and those that had ended (id -> reports seen: a trial not run again gets no more)."""
    status, results = fm.trial_status(plan.exp_dir), observe(plan)
    ended = {t: len(plan.seen.get(t, {}).get("rows", ())) for t, s in sorted(status.items()) if s in fm.ENDED}
    midway = {t: max(int(r.get("step", 0)) for r in rows) for t, rows in results.items()
              if t not in ended and not fm.finals(rows)}
    return {"touched": sorted(set(status) - set(ended)), "midway": midway, "ended": ended}


def _last_trials_midway(plan: SoakPlan) -> bool:
    """Every trial has reported (so none is pending) and one not ended (ASHA's stopped trials have no
    final either) is midway."""
    results, expected, status = observe(plan), _expected(plan.exp_dir), fm.trial_status(plan.exp_dir)
    return bool(expected) and len(results) >= expected and any(
        not fm.finals(rows) and status.get(t) not in fm.ENDED for t, rows in results.items())


def _wait(proc: subprocess.Popen, ready, timeout: float) -> bool:
    """Poll until `ready()` (True) or the driver exits or the time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(POLL_S)
    return False


# ----------------------------------------------------------------------------- faults


def inject_kill(plan: SoakPlan, proc: subprocess.Popen, rng: random.Random, t0: float) -> dict | None:
    """SIGKILL the driver's process group at a random moment after its first new report (or once
    `plan.kill_when(snapshot)` holds)."""
    before, delay = _reports(plan), 0.0
    if plan.kill_when is not None:
        if not _wait(proc, lambda: plan.kill_when(snapshot(plan)), plan.start_timeout):
            return None
    elif _wait(proc, lambda: _reports(plan) > before, plan.start_timeout):
        delay = rng.uniform(0, plan.max_delay)
        _wait(proc, lambda: False, delay)
    else:
        return None
    if proc.poll() is not None:  # the sweep ended first
        return None
    state = snapshot(plan)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kill_session(proc.pid)
    return {"fault": SIGKILL_FAULT, "at_s": round(time.time() - t0, 1), "delay_s": round(delay, 2), **state}


def inject_interrupt(plan: SoakPlan, proc: subprocess.Popen, log: Path, t0: float) -> dict | None:
    """SIGINT (Ctrl-C) to the driver once every trial has started and one is midway."""
    if not _wait(proc, lambda: _last_trials_midway(plan), plan.start_timeout * 4):  # waves of trials
        return None
    state = snapshot(plan)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver; Tune stops the trials
    try:
        rc = proc.wait(timeout=180)
    finally:
        kill_session(proc.pid)
    out = log.read_text(errors="replace")
    ended = sum(1 for rows in fm.trial_results(plan.exp_dir).values() if fm.finals(rows))
    return {"fault": SIGINT_FAULT, "at_s": round(time.time() - t0, 1), "rc": rc, "log": str(log),
            "said_interrupted": f"interrupted ({ended} of {_expected(plan.exp_dir)} trials finished)" in out,
            "wrote_report": "ablation report" in out, **state}


def ray_start_failed(proc: subprocess.Popen, log: Path) -> bool:
    """The driver exited non-zero in Ray's node start (RAY_START_TIMEOUT in its log)."""
    return proc.poll() not in (None, 0) and RAY_START_TIMEOUT in Path(log).read_text(errors="replace")


def _started_again(plan: SoakPlan, proc, log, n: int):
    """After a start that died in Ray's node start: the same start again (with --resume: nothing
    of the sweep had started), or None when it was not that or the retries are spent."""
    if not ray_start_failed(proc, log) or plan.start_retries >= MAX_START_RETRIES:
        return None
    plan.start_retries += 1
    kill_session(proc.pid)
    print(f"[soak] Ray's node start timed out (start {n}); starting again "
          f"({plan.start_retries} of {MAX_START_RETRIES})", flush=True)
    return (*start_driver(plan, resume=True, n=n + 1), n + 1)


def run_soak(plan: SoakPlan) -> dict:
    """Start the sweep, inject the planned faults (resuming after each), run it to its end; the
    injections, the final start's exit code and log, and the fault matrix."""
    rng, t0, n = random.Random(plan.seed), time.time(), 0
    faults = [SIGKILL_FAULT] * plan.kills + [SIGINT_FAULT] * plan.interrupts
    proc, log = start_driver(plan, resume=False, n=n)
    try:
        for fault in faults:
            while True:
                inj = (inject_kill(plan, proc, rng, t0) if fault == SIGKILL_FAULT
                       else inject_interrupt(plan, proc, log, t0))
                again = _started_again(plan, proc, log, n) if inj is None else None
                if again is None:
                    break
                proc, log, n = again
            if inj is None:  # the sweep ended before this fault: the rest are not injected
                break
            plan.injections.append(inj)
            if plan.after_fault is not None:
                plan.after_fault(inj)
            print(f"[soak] {fault} #{len(plan.injections)} at {inj['at_s']} s; "
                  f"{len(inj['touched'])} trials touched, midway {inj['midway']}", flush=True)
            n += 1
            proc, log = start_driver(plan, resume=True, n=n)
        rc = proc.wait(timeout=plan.start_timeout * 4)
        while (again := _started_again(plan, proc, log, n)) is not None:
            proc, log, n = again
            rc = proc.wait(timeout=plan.start_timeout * 4)
    finally:
        kill_session(proc.pid)
    if plan.worker_marker.is_file():  # "rank R exited at step S of trial T"
        plan.injections.append({"fault": WORKER_FAULT, "touched": [plan.worker_marker.read_text().split()[-1]],
                                "midway": {}, "ended": {}})
    observe(plan)
    per_trial = fm.trial_faults(plan.exp_dir, plan.tracking_uri, plan.name, _expected(plan.exp_dir), plan.seen)
    rows = fm.fault_matrix(per_trial, plan.injections)
    return {"name": plan.name, "job": plan.job, "seed": plan.seed, "planned": len(faults) + bool(plan.kill_worker),
            "injections": plan.injections, "final_rc": rc, "final_log": str(log), "starts": n + 1,
            "ray_start_retries": plan.start_retries,
            "wall_s": round(time.time() - t0, 1), "trials": per_trial, "matrix": rows,
            "reports_seen": {t: len(seen["rows"]) for t, seen in plan.seen.items()},
            "resumed_from_seen": {t: sorted(x for x in seen["resumed"] if x is not None)
                                  for t, seen in plan.seen.items()}}


# ----------------------------------------------------------------------------- the job


def build_parser(prog: str | None = None):
    import argparse

    p = argparse.ArgumentParser(
        prog=prog, description="Kill a sweep's driver at random moments, resume it each time, then print "
        "its fault matrix. The sweep's job and options go after `--` (default: " + " ".join(DEFAULT_JOB) + ").")
    p.add_argument("--kills", type=int, default=10, help="driver SIGKILLs (default 10)")
    p.add_argument("--interrupts", type=int, default=1, help="Ctrl-C (SIGINT) while the last trials run (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default 0)")
    p.add_argument("--max-delay", type=float, default=10.0,
                   help="a kill lands 0 to this many seconds after a start's first new report (default 10)")
    p.add_argument("--kill-worker", metavar="RANK:STEP",
                   help="also that Train worker exits at that step, once in the sweep (tests/support/faults' hook)")
    p.add_argument("--name", default="soak", help="the sweep's name (default soak)")
    p.add_argument("--runs-dir", help="its storage, MLflow store and logs (default <repo>/runs/soak-<time>)")
    p.add_argument("--out", help="the fault matrix as JSON (default <runs-dir>/fault_matrix.json)")
    p.add_argument("job", nargs="*", help="the sweep's job and its options")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ..core.errors import UserError

    args = build_parser(prog).parse_args(argv)
    if args.kills < 0 or args.interrupts < 0 or args.max_delay < 0:
        print("error: --kills, --interrupts and --max-delay must be >= 0", file=sys.stderr)
        return 2
    runs = Path(args.runs_dir or _repo() / "runs" / time.strftime("soak-%Y%m%d-%H%M%S")).resolve()
    if (runs / args.name).exists():
        print(f"error: {runs / args.name} exists: the soak needs a fresh sweep (another --name or --runs-dir)",
              file=sys.stderr)
        return 2
    plan = SoakPlan(job=args.job or DEFAULT_JOB, name=args.name, storage=runs, log_dir=runs / "logs",
                    tracking_uri=f"sqlite:///{runs / 'mlflow.db'}", kills=args.kills,
                    interrupts=args.interrupts, seed=args.seed, max_delay=args.max_delay, kill_worker=args.kill_worker)
    try:
        result = run_soak(plan)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or runs / "fault_matrix.json")
    out.write_text(json.dumps(result, indent=2, default=str))
    injected = len(result["injections"])
    print(f"\nfault matrix ({injected} of {result['planned']} faults injected, {result['starts']} starts "
          f"({result['ray_start_retries']} of them again after Ray's node start timed out), "
          f"{result['wall_s']:.0f} s; final exit {result['final_rc']}; JSON {out}):\n")
    print(fm.markdown(result["matrix"]))
    ok = fm.clean(result["matrix"]) and injected == result["planned"] and result["final_rc"] == 0
    return 0 if ok else 1
