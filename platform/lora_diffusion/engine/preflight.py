"""What a sweep checks of the world before Ray starts and before anything is written: the MLflow
store answers (or can be written), the Ray cluster to join answers, the GPUs asked for exist, and
a backbone given as a directory is there, and what the config asks of the backbone (injection
layers, ranks against the hidden size) fits its config.json.

Each check takes at most a few seconds (`TIMEOUT_S`) and raises one `UserError` naming the
option and what was wrong: a typo must not cost a cluster start-up, nor leave a half-made sweep.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ..core.errors import UserError

TIMEOUT_S = 3.0
# MLflow's tracking stores; a URI with any other scheme fails in MLflow only when first used
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> None:
    """http(s): one request to the server's /health with a short timeout; file/sqlite: the
    store's directory can be written (created if missing); other SQL stores: taken as given."""
    scheme = urlparse(uri).scheme.split("+")[0] if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        raise UserError(f"--tracking-uri: {uri!r}: unknown scheme {scheme!r} "
                        f"(valid: {', '.join(TRACKING_SCHEMES)}, or a directory)")
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise UserError(f"--tracking-uri: {uri}: a SQLite store is sqlite:///ABSOLUTE/PATH.db")
        _check_writable_dir(Path("/" + uri[len("sqlite:///"):].lstrip("/")).parent, uri)
    elif scheme in ("", "file"):
        _check_writable_dir(Path(urlparse(uri).path if scheme else uri), uri)


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise UserError(f"--tracking-uri: {uri} refused the request (HTTP {exc.code}): "
                            "set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN") from None
        return  # it answered: a server without /health is still a server
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--tracking-uri: cannot reach the MLflow server {uri} within {TIMEOUT_S:g} s "
                        f"({reason}); start it or pass another --tracking-uri") from None


def _check_writable_dir(directory: Path, uri: str) -> None:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--tracking-uri: {uri}: cannot write to {existing} (the store's directory)")


def check_address(address: str) -> None:
    """'local' starts a private Ray; 'auto' and HOST:PORT (or ray://HOST:PORT) must answer."""
    if address == "local":
        return
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or _running_cluster()
        if address is None:
            raise UserError("--address auto: no running Ray cluster found on this machine (start one "
                            "with `ray start --head`, or pass --address local)")
        if address == "local":
            return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: {address!r} is not 'auto', 'local', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"--address: cannot reach a Ray cluster at {hostport} within {TIMEOUT_S:g} s "
                        f"({exc.strerror or exc}); is `ray start --head` running there?") from None


def _running_cluster() -> str | None:
    """The address `ray.init('auto')` would join, found the way Ray finds it (its temp dir's
    ray_current_cluster, else a running GCS process); None if there is none."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # Ray moved it: let ray.init decide
        return "auto-unchecked"
    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        return None


def check_gpus(gpus_per_worker: float | None, address: str, workers: int | None = None) -> None:
    """--gpus-per-worker > 0 on a local Ray without a visible GPU would wait forever for one. A
    cluster (any other address) is checked when Ray has joined it (`check_cluster_gpus`). A rank
    drives one GPU: a fraction with several ranks could put two NCCL ranks of one trial on one
    GPU, and more than one GPU per rank leaves all but one idle (engine/resources.py)."""
    if not gpus_per_worker:
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker: must be >= 0, got {gpus_per_worker}")
        return
    if gpus_per_worker > 1:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: a worker (rank) drives one GPU; for "
                        "several GPUs a trial pass --workers N with --gpus-per-worker 1 (or leave both "
                        "to the memory plan)")
    if gpus_per_worker < 1 and (workers or 1) > 1:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g} with --workers {workers}: two ranks of one "
                        "trial could share a GPU; give each rank a whole GPU (1), or run one worker a trial")
    if address == "local":
        import torch

        if torch.cuda.device_count() == 0:
            raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: no GPU is visible on this machine "
                            "(CUDA_VISIBLE_DEVICES, drivers); pass --gpus-per-worker 0")


def check_cluster_gpus(gpus_per_worker: float, cluster_gpus: float) -> None:
    """On a cluster with no GPU up, trials asking for one would wait for a node, and the sweep
    cannot pack them: refuse. cluster.yaml keeps one GPU node up (min_workers: 1; more start
    through the autoscaler when trials ask for more GPUs than are up), so a GPU is missing only
    while that node is still joining after `ray up`, or on a cluster configured otherwise."""
    if gpus_per_worker and not cluster_gpus:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has no GPU up (cluster.yaml "
                        "keeps one GPU node: it joins minutes after `ray up`; submit when `ray status` lists "
                        "a GPU, or pass --gpus-per-worker 0)")


def check_memory(config, gpus_per_worker: float | None, workers: int, gpu_memory_gib: float) -> None:
    """A GPU trial whose memory plan (core/memory_plan.py, the backbone on the meta device) does
    not fit the GPUs it asks for is one UserError naming the field to change, before Ray starts.
    CPU trials (no GPU asked for) are not planned."""
    if not gpus_per_worker:
        return
    from ..core.memory_plan import refuse_unfit

    refuse_unfit(config, gpu_memory_gib=gpu_memory_gib, workers=workers,
                 gpus_per_trial=max(1, int(gpus_per_worker * workers)))


PREPARE_HINT = ("a prepared CPU diffusion LM is made first by `lora-diffusion prepare-backbone "
                "--mode full --out {name}` (README: A CPU diffusion LM)")


def check_backbone(name: str, allow_hub: bool) -> str:
    """The backbone every trial will load, checked on the driver: a missing directory is one
    error naming it here, not one failed trial per cell. Returns the name to give the trials: a
    local directory as an absolute path (Ray runs trials in their own working directories),
    packaged short names and hub ids unchanged."""
    from ..core.backbone import loads_offline, resolve_backbone

    source = resolve_backbone(name)
    if source != name:  # a packaged short name (or the tiny test model): resolved on each node
        return name
    path = Path(os.path.abspath(Path(name).expanduser()))  # a link (prepare's --out) stays a link
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"backbone: {name}: {path} has no config.json (not a model "
                            "directory; " + PREPARE_HINT.format(name=name) + ")")
        return str(path)
    if allow_hub or loads_offline(name):
        return name  # a hub id
    if os.sep not in name and not name.startswith((".", "~")):
        raise UserError(f"backbone: '{name}' is neither a local directory nor in the Hugging Face "
                        "cache (set allow_hub: true to download hub ids)")
    raise UserError(f"backbone: {name}: no such directory ({path}); "
                    + PREPARE_HINT.format(name=name))


# where a config.json gives the block count: BERT-family, ModernBERT and Dream; LLaDA; MDLM
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "n_blocks", "num_layers")


def check_backbone_fit(fixed: dict, grid, cells_too: bool = True) -> None:
    """Every config value that depends on the backbone (a trajectory module's rank against the
    hidden size, its injection layers and Solo Connection's blocks against the block count),
    checked against the backbone's config.json before Ray starts, by the methods' own checks,
    for the fixed config and every cell of a grid (a GridSpec): not one failed trial per cell. A
    backbone whose config cannot be read here (a hub id not in the cache) is left to the trials.
    `cells_too=False` (--smoke on its own tiny backbone: a grid written for a real backbone,
    whose wide cells are known to fail there, as its file says) checks the fixed config only."""
    import itertools

    from ..core import config as config_lib

    cells = [{}] if grid is None or not cells_too else grid.cells if grid.cells is not None else \
        [dict(zip(grid.axes, combo)) for combo in itertools.product(*grid.axes.values())]
    sizes: dict[tuple[str, str], tuple[int, int] | None] = {}
    for config in (config_lib.from_dict({}, {**fixed, **cell}) for cell in cells):
        key = (config.backbone, config.backbone_family)
        if key not in sizes:
            sizes[key] = _backbone_sizes(*key)
        if sizes[key] is not None:
            _check_method_fits(config, *sizes[key])


def _backbone_sizes(backbone: str, family_name: str) -> tuple[int, int] | None:
    """(hidden size, block count) from the backbone's config.json, without loading a weight."""
    from types import SimpleNamespace

    from ..core import families
    from ..core.backbone import resolve_backbone

    try:
        data = families.read_model_config(resolve_backbone(backbone), local_only=True)
    except (OSError, ValueError, UserError):
        return None
    layers = next((data[k] for k in LAYER_COUNT_KEYS if isinstance(data.get(k), int)), None)
    if layers is None:
        return None
    return families.hidden_size(families.detect(data, family_name), SimpleNamespace(**data)), layers


def _check_method_fits(config, hidden: int, n_layers: int) -> None:
    from dataclasses import replace

    from ..core.methods import registry, solo, trajectory, trajectory_adapter

    method = registry.spec_of(config.method).method
    if issubclass(method, trajectory.TrajectoryMethod):
        tc = config.trajectory
        if issubclass(method, trajectory_adapter.TrajectoryAdapterMethod):  # every block: no layers to check
            tc = replace(tc, injection_layers=[])
        trajectory.check_fits_backbone(tc, hidden, n_layers)
    elif issubclass(method, solo.SoloConnection):
        solo.resolve_blocks(config.solo, n_layers)
