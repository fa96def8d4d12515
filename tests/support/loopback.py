"""Loopback servers for trying cluster.yaml on one machine: an sshd and an S3 API on 127.0.0.1.

Test infrastructure (tests/test_cluster_e2e.py, tests/test_storage.py), also served to
developers by jobs/local_cluster.py --sshd; nothing in the package uses it.

- `LoopbackSshd`: an sshd on 127.0.0.1 accepting one key for root. With `isolate=True` it runs
  in its own PID and mount namespaces (Linux, root): processes started over SSH (Ray, MLflow)
  see only each other, so the `ray stop` of `ray up`/`ray down` stops only this cluster's Ray, and
  stopping the sshd ends all of them; HOME and /tmp/ray are private directories, so nothing of
  the cluster lands in the real home directory. `env` goes into that HOME's .bashrc: what an
  instance profile gives a cloud node.
- `LoopbackS3`: an S3 API on 127.0.0.1 (moto's server, in memory) holding the bucket that
  cluster.yaml names, and the AWS_* environment that points a node at it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lora_diffusion.engine.cluster import make_key


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools(isolate: bool = False) -> list[str]:
    tools = ["sshd", "ssh", "ssh-keygen", "rsync"] + (["unshare", "mount"] if isolate else [])
    return [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]


class LoopbackSshd:
    """sshd on 127.0.0.1:`port` that lets `user` in with the key `workdir`/id_ed25519.

    isolate=True (root only): own PID and mount namespaces; HOME of `user` is `workdir`/home, with
    `project_link` -> the checkout when given (the cluster then uses this checkout and its
    .venv instead of copying the project and building a venv), `env` exported from its .bashrc,
    and /tmp/ray is `workdir`/ray-tmp. stop() kills the namespace's first process: everything in
    it (Ray, MLflow, SSH sessions) ends with it."""

    def __init__(self, workdir: str | Path, *, port: int | None = None, user: str = "root",
                 isolate: bool = False, env: dict[str, str] | None = None,
                 project_link: tuple[str, str | Path] | None = None):
        self.workdir = Path(workdir).resolve()
        self.port = port if port is not None else (22 if port_free(22) else free_port())
        self.user, self.isolate = user, isolate
        self.env = dict(env or {})
        self.project_link = project_link
        self.key = self.workdir / "id_ed25519"
        self.home = self.workdir / "home"
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "sshd.log"

    def start(self, timeout: float = 20) -> LoopbackSshd:
        if self.isolate and os.geteuid() != 0:
            raise RuntimeError("an isolated sshd needs root (unshare, mount)")
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")
        if sshd is None:
            raise RuntimeError("sshd is not installed (apt-get install openssh-server)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        cmd = [sshd, "-D", "-e", "-f", str(self._write_config())]
        if self.isolate:
            cmd = self._in_namespaces(cmd)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self._login_works():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"sshd on 127.0.0.1:{self.port} did not accept the key in {timeout:.0f} s: "
                           f"{self.log.read_text()[-2000:]}")

    def _write_config(self) -> Path:
        """Keys (the user's and the host's), authorized_keys and sshd_config in `workdir`."""
        make_key(self.key)
        host_key = make_key(self.workdir / "host_ed25519")
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(Path(str(self.key) + ".pub").read_text())
        authorized.chmod(0o600)
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}", f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
            "PrintLastLog no", f"PidFile {self.workdir / 'sshd.pid'}", "MaxStartups 50", "MaxSessions 50",
            "LogLevel ERROR", ""]))
        return config

    def _in_namespaces(self, cmd: list[str]) -> list[str]:
        """`cmd` in its own PID and mount namespaces, with HOME, /tmp/ray and /etc/passwd of its own."""
        for d in (self.home, self.workdir / "ray-tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self._write_home()
        script = " && ".join([
            "mkdir -p /tmp/ray", f"mount --bind {self.workdir / 'ray-tmp'} /tmp/ray",
            f"mount --bind {self._write_passwd()} /etc/passwd",
            "exec " + " ".join(cmd)])
        return ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
                "bash", "-c", script]

    def _write_home(self) -> None:
        """`env` exported from HOME's .bashrc (earlier exports of other names kept), and the
        project link."""
        bashrc = self.home / ".bashrc"
        kept = [line for line in (bashrc.read_text().splitlines() if bashrc.exists() else [])
                if not line.startswith("export ") or line.split("=", 1)[0][7:] not in self.env]
        bashrc.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())
                          + "".join(line + "\n" for line in kept))
        if self.project_link:
            name, target = self.project_link
            link = self.home / name
            if not link.is_symlink():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)

    def _write_passwd(self) -> Path:
        """The user's home directory is `home` in the namespace only: a copy of /etc/passwd that
        says so is mounted over it (the real home stays visible: Python may live there)."""
        passwd = self.workdir / "passwd"
        lines = []
        for line in Path("/etc/passwd").read_text().splitlines():
            f = line.split(":")
            if len(f) >= 7 and f[0] == self.user:
                f[5] = str(self.home)
            lines.append(":".join(f))
        passwd.write_text("\n".join(lines) + "\n")
        passwd.chmod(0o644)
        return passwd

    def ssh_command(self, command: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                f"{self.user}@127.0.0.1", command]

    def _login_works(self) -> bool:
        r = subprocess.run(self.ssh_command("true"), capture_output=True, timeout=15)
        return r.returncode == 0

    def namespace_pids(self) -> list[int]:
        """Host pids of every process in the sshd's PID namespace (isolate=True), else of sshd."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            ns = os.readlink(f"/proc/{self._first_pid()}/ns/pid")
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def _first_pid(self) -> int:
        """The namespace's first process (the child of `unshare --fork`), else the sshd itself."""
        if not self.isolate:
            return self.proc.pid
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return int(children[0]) if children else self.proc.pid
        except OSError:
            return self.proc.pid

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            first = self._first_pid()
            for pid in ([first] if self.isolate else []) + [self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)  # pid 1 of the namespace: the kernel ends the rest
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()




class LoopbackS3:
    """moto's S3 server on 127.0.0.1 (state in memory) with `bucket` created: the object store of
    a one-machine cluster. `env` is what a node needs to use it (endpoint and dummy keys)."""

    def __init__(self, bucket: str, port: int | None = None, log: str | Path | None = None):
        self.bucket, self.port = bucket, port or free_port()
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "loopback",
                "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="loopback",
                            aws_secret_access_key="loopback", region_name="us-east-1")

    def start(self, timeout: float = 30) -> LoopbackS3:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited with {self.proc.returncode}")
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception:  # not listening yet
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"moto's S3 server on 127.0.0.1:{self.port} did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
