"""Write the one-machine variant of cluster.yaml, and optionally serve the sshd it logs in to.

    python jobs/local_cluster.py --out runs/cluster.local.yaml            # your own sshd on port 22
    python jobs/local_cluster.py --out runs/cluster.local.yaml --sshd     # plus an sshd of its own, until Ctrl-C

The variant is cluster.yaml with only the provider (local, head 127.0.0.1, no workers), auth (a key
for root on loopback) and node types replaced (lora_diffusion.engine.cluster.local_variant). Then:

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

import argparse
import signal
import sys
from pathlib import Path

from lora_diffusion.engine import cluster

REPO = Path(__file__).resolve().parents[1]
# The loopback sshd and S3 server are test infrastructure (tests/support/loopback.py), not part
# of the package: --sshd serves them from this checkout.
sys.path.insert(0, str(REPO / "tests"))
from support import loopback  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster-yaml", default=str(REPO / "cluster.yaml"), help="default: %(default)s")
    p.add_argument("--out", default=str(REPO / "runs" / "cluster.local.yaml"), help="default: %(default)s")
    p.add_argument("--user", default="root", help="SSH user on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--ssh-key", help="private key of USER on 127.0.0.1 (default: ~/.ssh/ray-local, made if "
                   "missing; with --sshd: runs/local-cluster/id_ed25519)")
    p.add_argument("--port", type=int, default=22, help="sshd port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--sshd", action="store_true", help="run an isolated sshd on 127.0.0.1 until Ctrl-C")
    p.add_argument("--workdir", default=str(REPO / "runs" / "local-cluster"),
                   help="--sshd: its keys and HOME (default: %(default)s)")
    args = p.parse_args(argv)

    sshd = s3 = None
    if args.sshd:
        missing = loopback.missing_tools(isolate=True)
        if missing:
            print(f"error: not installed: {', '.join(missing)} (apt-get install openssh-server rsync)",
                  file=sys.stderr)
            return 2
        s3 = loopback.LoopbackS3(cluster.bucket_of(args.cluster_yaml), log=Path(args.workdir) / "s3.log")
        sshd = loopback.LoopbackSshd(args.workdir, port=args.port, user=args.user, isolate=True,
                                    env=s3.env, project_link=("lora-diffusion", REPO))
        try:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            s3.start()
            sshd.start()
        except RuntimeError as exc:
            s3.stop()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        key = sshd.key
    else:
        key = cluster.make_key(Path(args.ssh_key or "~/.ssh/ray-local").expanduser())
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


if __name__ == "__main__":
    sys.exit(main())
