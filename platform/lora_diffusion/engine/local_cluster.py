"""`lora-diffusion local-cluster`: write the one-machine variant of cluster.yaml, and optionally
serve the sshd it logs in to.

    lora-diffusion local-cluster --out runs/cluster.local.yaml            # your own sshd on port 22
    lora-diffusion local-cluster --out runs/cluster.local.yaml --sshd     # plus an sshd of its own, until Ctrl-C

The variant is cluster.yaml with only the provider (local, head 127.0.0.1, no workers), auth (a key
for root on loopback) and node types replaced (cluster.local_variant). Then:

    ray up -y runs/cluster.local.yaml
    ray submit runs/cluster.local.yaml jobs/rank_schedule_sweep.py -- --smoke
    ray down -y runs/cluster.local.yaml

--sshd (root, Linux) runs sshd on 127.0.0.1 in its own PID and mount namespaces: the cluster's
`ray stop` and processes stay inside it, its HOME is runs/local-cluster/home (where
~/lora-diffusion links to this checkout, so setup reuses this .venv), and an S3 server on
loopback (moto, in memory: gone with Ctrl-C) stands in for the bucket cluster.yaml names; the
node's .bashrc points AWS_ENDPOINT_URL at it. Without --sshd, USER's ~/lora-diffusion is where the
cluster puts the project (a copy with its own venv, unless you link it to this checkout yourself:
`ln -s "$PWD" ~/lora-diffusion`), and USER's AWS credentials must reach the bucket.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..core.errors import UserError
from . import cluster
from .options import repo_root


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    repo = repo_root()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-yaml", default=str(repo / "cluster.yaml"), help="default: %(default)s")
    p.add_argument("--out", default=str(repo / "runs" / "cluster.local.yaml"), help="default: %(default)s")
    p.add_argument("--user", default="root", help="SSH user on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--ssh-key", help="private key of USER on 127.0.0.1 (default: ~/.ssh/ray-local, made if "
                   "missing; with --sshd: runs/local-cluster/id_ed25519)")
    p.add_argument("--port", type=int, default=22, help="sshd port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--sshd", action="store_true", help="run an isolated sshd on 127.0.0.1 until Ctrl-C")
    p.add_argument("--workdir", default=str(repo / "runs" / "local-cluster"),
                   help="--sshd: its keys and HOME (default: %(default)s)")
    return p


def _loopback():
    """The loopback sshd and S3 server are test infrastructure (tests/support/loopback.py), not
    part of the package: --sshd serves them from the checkout the package is installed from."""
    tests = repo_root() / "tests"
    if not (tests / "support" / "loopback.py").is_file():
        raise UserError(f"--sshd: needs a checkout of the project ({tests}/support/loopback.py not found)")
    sys.path.insert(0, str(tests))
    from support import loopback

    return loopback


def start_loopback(args):
    """The sshd and S3 server on 127.0.0.1, started; UserError when they cannot run here."""
    loopback = _loopback()
    missing = loopback.missing_tools(isolate=True)
    if missing:
        raise UserError(f"--sshd: not installed: {', '.join(missing)} (apt-get install openssh-server rsync)")
    s3 = loopback.LoopbackS3(cluster.bucket_of(args.cluster_yaml), log=Path(args.workdir) / "s3.log")
    sshd = loopback.LoopbackSshd(args.workdir, port=args.port, user=args.user, isolate=True,
                                 env=s3.env, project_link=("lora-diffusion", repo_root()))
    try:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        s3.start()
        sshd.start()
    except RuntimeError as exc:
        s3.stop()
        raise UserError(f"--sshd: {exc}") from None
    return sshd, s3


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    sshd, s3 = start_loopback(args) if args.sshd else (None, None)
    key = sshd.key if sshd else cluster.make_key(Path(args.ssh_key or "~/.ssh/ray-local").expanduser())
    out = cluster.write_yaml(cluster.local_variant(args.cluster_yaml, key, args.user, ssh_port=args.port),
                             args.out)
    print(f"wrote {out} (ssh {args.user}@127.0.0.1:{args.port}, key {key})")
    if sshd is None:
        print(f"the key must be in {args.user}'s authorized_keys: cat {key}.pub >> ~{args.user}/.ssh/authorized_keys")
        return 0
    print(f"sshd on 127.0.0.1:{sshd.port}, HOME {sshd.home}; S3 on {s3.endpoint} (bucket {s3.bucket}; "
          f"export {' '.join(f'{k}={v}' for k, v in s3.env.items())} to look into it); "
          "Ctrl-C stops them and every process of the cluster", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        sshd.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sshd.stop()
        s3.stop()
    return 0
