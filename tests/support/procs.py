"""Process-session helpers for tests that start and SIGKILL whole process trees."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session the driver was started in (ours only, by pid)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def start_driver(cmd: list, log: Path, env: dict, sessions: list) -> subprocess.Popen:
    """Start a job's driver from the repository root in a session of its own (so that the test can
    kill its whole process tree), output to `log`; its pid goes on `sessions` for the cleanup."""
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sessions.append(proc.pid)
    return proc
