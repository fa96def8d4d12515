"""Sweep storage on a directory or an object store (S3 API on loopback: moto's server).

The cluster keeps its sweeps in a bucket (cluster.yaml); these check what the sweep engine does
with such a location before Ray starts: our own files go to and come back from the bucket, an
existing sweep there is refused without --resume, a missing one with --resume names the URI, and
an unwritable location fails before anything starts. (Ray itself writing there is exercised by
tests/test_cluster_e2e.py, which runs a smoke sweep on the bucket.)"""

from __future__ import annotations

import json

import pytest

from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import options, spec as spec_lib
from lora_diffusion.engine.storage import SweepStorage, is_uri
from support.loopback import LoopbackS3

BUCKET = "storage-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = LoopbackS3(BUCKET, log=tmp_path_factory.mktemp("s3") / "s3.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def test_local_storage_join_read_write(tmp_path):
    st = SweepStorage(tmp_path / "sweeps")
    assert st.is_local and not is_uri(str(tmp_path))
    assert st.join("a", "train") == str(tmp_path / "sweeps" / "a" / "train")
    assert not st.exists("a/sweep.json") and not st.is_nonempty_dir("a")
    st.write_text("a/sweep.json", '{"x": 1}')
    assert st.read_text("a/sweep.json") == '{"x": 1}' and st.is_nonempty_dir("a")
    assert SweepStorage(f"file://{tmp_path}/sweeps").join("a") == st.join("a")


def test_s3_storage_roundtrip_and_uri_options(s3_env):
    st = SweepStorage(f"s3://{BUCKET}/sweeps")
    assert not st.is_local
    assert st.join("exp", "train") == f"s3://{BUCKET}/sweeps/exp/train"
    st.write_text("exp/sweep.json", "{}")
    assert st.exists("exp/sweep.json") and st.is_nonempty_dir("exp") and not st.is_nonempty_dir("other")
    key = s3_env.client().get_object(Bucket=BUCKET, Key="sweeps/exp/sweep.json")
    assert key["Body"].read() == b"{}"
    # pyarrow's query options stay on every location handed to Ray
    with_opts = SweepStorage(f"s3://{BUCKET}/sweeps?endpoint_override=127.0.0.1:{s3_env.port}&scheme=http")
    assert with_opts.join("exp") == f"s3://{BUCKET}/sweeps/exp?endpoint_override=127.0.0.1:{s3_env.port}&scheme=http"
    assert with_opts.read_text("exp/sweep.json") == "{}"


def test_unwritable_bucket_fails_before_ray_naming_it(s3_env):
    st = SweepStorage("s3://no-such-bucket-here/sweeps")
    with pytest.raises(UserError, match="no-such-bucket-here"):
        st.check_writable()


def _args(*argv):
    return options.build_parser("rank_schedule").parse_args(list(argv))


def test_existing_sweep_in_bucket_is_refused_and_missing_resume_names_uri(s3_env, tmp_path):
    uri = f"s3://{BUCKET}/engine"
    SweepStorage(uri).write_text("taken/sweep.json", json.dumps({}))
    SweepStorage(uri).write_text("taken/experiment_state-2026-01-01_00-00-00.json", "{}")  # it started
    with pytest.raises(UserError, match=f"already exists in s3://{BUCKET}/engine/taken"):
        spec_lib.prepare(_args("--smoke", "--name", "taken", "--storage-path", uri,
                               "--tracking-uri", f"sqlite:///{tmp_path}/m.db"))
    with pytest.raises(UserError, match=f"no sweep named 'absent' in s3://{BUCKET}/engine"):
        spec_lib.prepare(_args("--smoke", "--name", "absent", "--resume", "--storage-path", uri))


def test_storage_defaults_to_env_then_repo(monkeypatch, tmp_path, synthetic_data_dir):
    monkeypatch.setenv("LORA_DIFFUSION_STORAGE", str(tmp_path / "from-env"))
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))  # prepare checks the data
    spec = spec_lib.prepare(_args("--smoke", "--name", "s1", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"))
    assert spec.storage == str(tmp_path / "from-env") and spec.exp_dir == str(tmp_path / "from-env" / "s1")
    assert spec.base_overrides["backbone"] == spec_lib.TINY_BACKBONE  # no path under the storage


def test_unreachable_store_is_one_error_naming_it_before_anything_is_written(tmp_path):
    """No S3 server on port 1: the existence check fails as a UserError with the location."""
    uri = "s3://b/sweeps?endpoint_override=127.0.0.1:1&scheme=http"
    with pytest.raises(UserError, match="cannot reach s3://b/sweeps/s2"):
        spec_lib.prepare(_args("--smoke", "--name", "s2", "--storage-path", uri,
                               "--tracking-uri", f"sqlite:///{tmp_path}/m.db"))
    assert not (tmp_path / "m.db").exists()


def test_missing_data_is_one_error_naming_the_file_before_ray_starts(tmp_path, monkeypatch):
    """A data_dir without the task's files fails in `prepare` (before Ray and MLflow), not as a
    failure in every trial."""
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(tmp_path / "no-data"))
    with pytest.raises(UserError, match=r"data_dir: missing file .*no-data/sst2/"):
        spec_lib.prepare(_args("--smoke", "--name", "s3", "--storage-path", str(tmp_path / "sweeps"),
                               "--tracking-uri", f"sqlite:///{tmp_path}/m.db"))
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "sweeps" / "s3").exists()


@pytest.mark.parametrize("space", ["rank_schedule", "grid_rank_schedule"])
def test_spec_reads_back_from_sweep_json(space, monkeypatch, tmp_path, real_data_dir):
    """--resume reads the spec back from sweep.json (the keys it always had); a file that lacks
    one is one error naming the file and the key."""
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(real_data_dir))
    spec = spec_lib.prepare(_args("--smoke", "--space", space, "--storage-path", str(tmp_path / "sweeps"),
                                  "--tracking-uri", f"sqlite:///{tmp_path}/m.db"))
    saved = json.loads(spec.to_json())
    assert list(saved) == ["name", "storage", "exp_dir", "space_path", "space_yaml", "base_overrides", "fixed",
                           "sweep", "kind", "grid", "smoke", "tracking_uri", "experiment", "max_failures",
                           "steps", "created", "sweep_id"]
    assert spec_lib.SweepSpec.from_json(spec.to_json(), "sweep.json") == spec
    del saved["sweep_id"]
    with pytest.raises(UserError, match="x/sweep.json: missing sweep_id"):
        spec_lib.SweepSpec.from_json(json.dumps(saved), "x/sweep.json")


def test_resume_survives_tunes_truncated_copy_of_sweep_json(tmp_path, synthetic_data_dir, monkeypatch):
    """Tune copies the top-level sweep.json back at every snapshot after a restore; a driver
    killed mid-copy leaves it empty. --resume reads the kept copy; a sweep of older code (top
    level only) still resumes, and an empty one without a kept copy is one error naming it."""
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    where = ["--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    spec = spec_lib.prepare(_args("--smoke", "--name", "k", *where))
    storage = SweepStorage(tmp_path / "sweeps")
    storage.write_kept("k/sweep.json", spec.to_json())
    storage.write_text("k/experiment_state-2026-01-01_00-00-00.json", "{}")
    assert (tmp_path / "sweeps" / "k" / ".kept" / "sweep.json").read_text() == spec.to_json()
    (tmp_path / "sweeps" / "k" / "sweep.json").write_text("")  # Tune's copy, killed
    assert spec_lib.prepare(_args("--name", "k", "--resume", *where)).sweep_id == spec.sweep_id

    (tmp_path / "sweeps" / "k" / "sweep.json").write_text(spec.to_json())
    (tmp_path / "sweeps" / "k" / ".kept" / "sweep.json").unlink()  # written by older code
    assert spec_lib.prepare(_args("--name", "k", "--resume", *where)).sweep_id == spec.sweep_id
    (tmp_path / "sweeps" / "k" / "sweep.json").write_text("")
    with pytest.raises(UserError, match=r"k/sweep.json is not a readable sweep spec"):
        spec_lib.prepare(_args("--name", "k", "--resume", *where))
