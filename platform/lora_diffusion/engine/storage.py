"""Where sweeps live: a local directory or an object-store URI, through `pyarrow.fs`.

Ray Tune and Train take the same strings as `storage_path` (they use pyarrow.fs themselves), so
a sweep on `s3://bucket/sweeps` keeps its Tune state, its trials' Train checkpoints and our own
`sweep.json` / `best.json` in the bucket: a new head node resumes it with `--resume`.

    storage = SweepStorage("s3://my-bucket/sweeps")          # or "runs/sweeps", "gs://...", "file:///..."
    storage.join("my-sweep", "train")  -> "s3://my-bucket/sweeps/my-sweep/train"  (for Ray)
    storage.write_text("my-sweep/sweep.json", text); storage.read_text(...); storage.exists(...)

Credentials and endpoints come from the environment, as pyarrow reads them (AWS_PROFILE, an
instance role, AWS_ENDPOINT_URL for S3-compatible stores such as MinIO); a URI may also carry
pyarrow's query options, e.g. `s3://bucket/sweeps?endpoint_override=host:9000&scheme=http`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.errors import UserError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_SCHEME.match(str(location)))


class SweepStorage:
    def __init__(self, location: str | os.PathLike):
        import pyarrow.fs as pafs

        location = str(location)
        if is_uri(location) and not location.startswith("file://"):
            scheme, _, rest = location.partition("://")
            if not rest.split("/", 1)[0].split("?", 1)[0]:
                raise UserError(f"--storage-path: {location!r} names no bucket ({scheme}://BUCKET/PATH)")
            base, _, self.query = location.partition("?")
            self.uri = base.rstrip("/")
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                raise UserError(f"--storage-path: cannot open {location!r}: {exc}".splitlines()[0]) from None
            self.root = self.root.rstrip("/")
            self.is_local = False
        else:
            path = Path(location[len("file://"):] if location.startswith("file://") else location)
            self.uri = str(path.expanduser().resolve())
            self.query, self.fs, self.root = "", pafs.LocalFileSystem(), self.uri
            self.is_local = True

    def __repr__(self) -> str:
        return f"SweepStorage({self.join()!r})"

    def join(self, *parts: str) -> str:
        """The location of `parts` below the root, as Ray's storage_path takes it."""
        base = "/".join([self.uri, *[p.strip("/") for p in parts if p]])
        return f"{base}?{self.query}" if self.query else base

    def _path(self, rel: str) -> str:
        return "/".join([self.root, rel.strip("/")]) if rel else self.root

    def _info(self, rel: str):
        """pyarrow's file info; an unreachable or forbidden store is one UserError naming it."""
        try:
            return self.fs.get_file_info(self._path(rel))
        except OSError as exc:
            raise UserError(f"--storage-path: cannot reach {self.join(rel)}: {exc}".splitlines()[0]) from None

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_nonempty_dir(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        if not self.exists(rel):
            return False
        return bool(self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True)))

    def names(self, rel: str) -> list[str]:
        """The base names of the entries in directory `rel` (none if it does not exist)."""
        import pyarrow.fs as pafs

        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return [info.base_name for info in infos]

    def local_copy(self, rel: str, scratch: str | os.PathLike) -> Path:
        """Directory `rel` as a local path: itself on a local store, else copied into `scratch`."""
        import pyarrow.fs as pafs

        if self.is_local:
            return Path(self._path(rel))
        dest = Path(scratch) / rel.strip("/").rsplit("/", 1)[-1]
        dest.mkdir(parents=True, exist_ok=True)  # pyarrow writes files into it, it makes no directory
        pafs.copy_files(self._path(rel), str(dest), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return dest

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        path = self._path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    # Tune owns the top level of a sweep's directory: on a restore it copies every top-level
    # *.json and *.pkl into its driver staging directory and copies the staging directory back
    # at every experiment snapshot, file by file and not atomically (Ray 2.60,
    # tune/execution/experiment_state.py: sync_down_experiment_state / sync_up). A driver killed
    # in that copy leaves our sweep.json truncated (seen: the soak test, 2026-12-05). So our
    # files are also kept one level down, where Tune never copies, and read from there first;
    # the top-level copy stays where users (and sweeps of older code) have it.
    KEPT = ".kept"

    def write_kept(self, rel: str, text: str) -> None:
        """`rel` (e.g. "my-sweep/sweep.json") and its kept copy ("my-sweep/.kept/sweep.json")."""
        self.write_text(self._kept(rel), text)
        self.write_text(rel, text)

    def read_kept(self, rel: str) -> str:
        """The kept copy of `rel` if there is one (sweeps of older code have none), else `rel`."""
        return self.read_text(self._kept(rel) if self.exists(self._kept(rel)) else rel)

    def _kept(self, rel: str) -> str:
        head, _, name = rel.strip("/").rpartition("/")
        return f"{head}/{self.KEPT}/{name}" if head else f"{self.KEPT}/{name}"

    def check_writable(self) -> None:
        """Fail now, with the location in the message, rather than after Ray has started."""
        probe = ".lora-diffusion-write-test"
        try:
            self.write_text(probe, "ok")
            self.fs.delete_file(self._path(probe))
        except OSError as exc:
            raise UserError(f"--storage-path: cannot write to {self.join()}: {exc}".splitlines()[0]) from None
