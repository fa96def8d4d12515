"""Process-session helpers for tests that start and SIGKILL whole process trees."""

import os


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session the driver was started in (ours only, by pid)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
