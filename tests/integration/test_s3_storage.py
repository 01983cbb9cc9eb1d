"""The artifact store and the self-improve flow on a real S3 server (SeaweedFS on
loopback, tests/s3server.py).

One flow run carries the outage: the server is stopped while `judge` commits
(its parts written, its manifest not yet) and started again, so the same run
shows the whole flow on S3, the Prefect retry and that the half-written
artifact never looked committed. Its re-runs and the secret search reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import run_with_task_runs, tiny_config_data
from s3server import S3Identity, S3Server

from alignflow.config import SelfImproveConfig
from alignflow.storage import s3 as storage_s3
from alignflow.storage.artifacts import MANIFEST, ArtifactError, ArtifactStore
from alignflow.storage.s3 import StorageConfigError

STAGES = ["prompts", "sample", "judge", "pairs", "logprobs", "train_dpo"]
REPO = Path(__file__).resolve().parents[2]
# Distinctive credentials: the secret search looks for these exact strings.
ENV_IDENTITY = S3Identity(f"AKIAENV{uuid.uuid4().hex[:12].upper()}", f"env-secret-{uuid.uuid4().hex}")
BLOCK_IDENTITY = S3Identity(f"AKIABLK{uuid.uuid4().hex[:12].upper()}", f"block-secret-{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"), [ENV_IDENTITY, BLOCK_IDENTITY])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env_credentials(s3):
    """The standard AWS variables hold ENV_IDENTITY (as a user's shell would), until the module ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", ENV_IDENTITY.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", ENV_IDENTITY.secret_key)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        yield


def _table(values) -> pa.Table:
    return pa.table({"id": list(values)})


def assert_intact(store: ArtifactStore, manifest: dict) -> None:
    """Every file a manifest lists exists and has the listed hash."""
    for name, digest in manifest["files"].items():
        data = store.read_bytes(store.uri(manifest["stage"], manifest["key"], name))
        assert hashlib.sha256(data).hexdigest() == digest, f"{manifest['stage']}/{manifest['key']}/{name}"


def object_names(store: ArtifactStore, stage: str, key: str) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in store.fs.ls(store.uri(stage, key), detail=False)}


# -- the store on S3 ---------------------------------------------------------------------------


def test_store_round_trip_on_s3(s3, env_credentials, tmp_path, monkeypatch):
    monkeypatch.setenv(storage_s3.ENDPOINT_ENV, s3.endpoint)  # endpoint from the environment here
    store = ArtifactStore(f"s3://{s3.bucket}/unit")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "w.bin").write_bytes(os.urandom(1000))
    ref = store.commit(
        "judge",
        "k1",
        tables=[_table([1, 2]), _table([3])],
        local_dirs={"merged": model},
        config={"mode": "refeval"},
        metrics={"rows_out": 3},
    )
    assert ref.uri == f"s3://{s3.bucket}/unit/judge/k1"
    assert store.is_committed("judge", "k1")
    assert store.read_table(ref).column("id").to_pylist() == [1, 2, 3]
    local = store.local_dir(ref, "merged", tmp_path / "cache")
    assert (local / "sub" / "w.bin").read_bytes() == (model / "sub" / "w.bin").read_bytes()
    assert_intact(store, store.manifest("judge", "k1"))
    assert store.find("k1") == ref
    # a rewritten part object is caught by its hash
    part = store.uri("judge", "k1", store.manifest("judge", "k1")["parts"][0])
    store.fs.pipe(part, b"not the committed bytes")
    with pytest.raises(ArtifactError, match="content hash does not match"):
        store.read_table(ref)


def test_files_without_a_manifest_are_not_committed(s3, env_credentials):
    store = ArtifactStore(f"s3://{s3.bucket}/unit", {"endpoint_url": s3.endpoint})
    store.fs.pipe(store.uri("sample", "dead", "part-00000-abc.parquet"), b"half")
    assert not store.is_committed("sample", "dead")
    assert "dead" not in {m["key"] for m in store.committed()}
    with pytest.raises(ArtifactError, match="never committed"):
        store.ref("sample", "dead")


def test_credentials_from_a_prefect_secret_block(s3, monkeypatch):
    from prefect.blocks.system import Secret

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    block = f"s3-test-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": BLOCK_IDENTITY.access_key, "secret": BLOCK_IDENTITY.secret_key}).save(block)
    store = ArtifactStore(f"s3://{s3.bucket}/block", {"endpoint_url": s3.endpoint, "credentials_block": block})
    ref = store.commit("pairs", "k", tables=[_table([7])], config={"x": 1})
    assert store.read_rows(ref) == [{"id": 7}]
    assert store.storage_options == {"endpoint_url": s3.endpoint, "credentials_block": block}
    for path in store.fs.find(f"{s3.bucket}/block"):
        assert BLOCK_IDENTITY.secret_key.encode() not in store.fs.cat_file(path), path
    with pytest.raises(StorageConfigError, match="no saved Prefect Secret block named 'no-such-block'"):
        ArtifactStore(f"s3://{s3.bucket}/block", {"endpoint_url": s3.endpoint, "credentials_block": "no-such-block"})


def test_no_credentials_is_one_clear_line(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage_s3._botocore_chain_has_credentials.cache_clear()
    try:
        with pytest.raises(StorageConfigError) as err:
            ArtifactStore("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9"})
    finally:
        storage_s3._botocore_chain_has_credentials.cache_clear()
    message = str(err.value)
    assert "\n" not in message
    assert "s3://bucket/prefix at http://127.0.0.1:9: no S3 credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message and "storage.credentials_block" in message


def test_credentials_in_the_root_url_or_config_are_refused():
    from alignflow.config import ConfigError, load_config

    with pytest.raises(StorageConfigError, match="credentials in the URL") as err:
        ArtifactStore("s3://AKIAXX:hunter2@bucket/prefix")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="credentials do not belong in the config") as err:
        load_config(SelfImproveConfig, None, ["storage.storage_options={key: AKIAXX, secret: hunter2}"])
    assert "hunter2" not in str(err.value) and "remove key, secret" in str(err.value)


# -- two writers of one key --------------------------------------------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
import pyarrow as pa
from alignflow.storage.artifacts import ArtifactStore

root, go, value = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store = ArtifactStore(root)
tables = [pa.table({"id": list(range(i * 500, (i + 1) * 500)), "writer": [value] * 500}) for i in range(8)]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
print(store.commit("pairs", "race", tables=tables, config={"same": "config"}).model_dump_json(), flush=True)
"""


@pytest.mark.parametrize("same_content", [True, False], ids=["same-config", "different-content"])
def test_concurrent_writers_of_one_key_leave_one_intact_artifact(s3, env_credentials, tmp_path, same_content):
    root = f"s3://{s3.bucket}/race-{uuid.uuid4().hex[:8]}"
    go = tmp_path / "go"
    env = {**os.environ, storage_s3.ENDPOINT_ENV: s3.endpoint}
    values = (1, 1) if same_content else (1, 2)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, root, str(go), str(v)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for v in values
    ]
    assert [w.stdout.readline().strip() for w in writers] == ["ready", "ready"]
    go.touch()
    store = ArtifactStore(root, {"endpoint_url": s3.endpoint})
    while any(w.poll() is None for w in writers):  # whatever manifest a reader meets mid-race is whole
        if store.is_committed("pairs", "race"):
            assert_intact(store, store.manifest("pairs", "race"))
    refs = [json.loads(w.stdout.read()) for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    manifest = store.manifest("pairs", "race")
    assert_intact(store, manifest)
    assert len(manifest["parts"]) == 8
    assert sum(n.startswith("part-") for n in object_names(store, "pairs", "race")) == 16  # both wrote
    table = store.read_table(store.ref("pairs", "race"))
    assert table.column("id").to_pylist() == list(range(4000))
    assert len(set(table.column("writer").to_pylist())) == 1  # one writer's rows, never a mix
    if same_content:
        assert refs[0]["content_hash"] == refs[1]["content_hash"] == manifest["content_hash"]


# -- the whole flow on S3 ----------------------------------------------------------------------


def run_flow(config: SelfImproveConfig):
    """Run the flow; return (summary, {task name: its task run})."""
    from alignflow.flows.self_improve import self_improve

    summary, runs = run_with_task_runs(self_improve, config)
    return summary, {r.name.rsplit("-", 1)[0]: r for r in runs}


class OutageDuringCommit:
    """Stops the S3 server as `stage` writes its manifest (its parts already written), lets
    that write fail, starts the server again and records what a reader then sees."""

    def __init__(self, server: S3Server, stage: str):
        self.server, self.stage = server, stage
        self.seen: dict | None = None

    def install(self, mp: pytest.MonkeyPatch) -> None:
        original = ArtifactStore._write_manifest

        def write_manifest(store, stage, key, manifest):
            if stage != self.stage or self.seen is not None:
                return original(store, stage, key, manifest)
            self.server.stop()
            try:
                return original(store, stage, key, manifest)
            finally:
                self.server.start()
                self.seen = {
                    "key": key,
                    "files": set(manifest["files"]),
                    "committed": store.is_committed(stage, key),
                    "objects": object_names(store, stage, key),
                }

        mp.setattr(ArtifactStore, "_write_manifest", write_manifest)


@pytest.fixture(scope="module")
def s3_run(s3, env_credentials, tiny_model_dir, tmp_path_factory):
    """(config, summary, task runs, outage record, log file) of one flow run on S3 with an outage."""
    from alignflow.runtime import configure_environment

    home = tmp_path_factory.mktemp("s3-flow-home")
    config = SelfImproveConfig.model_validate(
        tiny_config_data(
            tiny_model_dir,
            home,
            paths__artifact_root=f"s3://{s3.bucket}/flow",
            storage__endpoint_url=s3.endpoint,
            # fail fast while the server is down: the Prefect retry is what this run tests
            storage__storage_options={"config_kwargs": {"retries": {"max_attempts": 3}}},
        )
    )
    log_file = configure_environment(config.paths.resolved())
    outage = OutageDuringCommit(s3, "judge")
    try:
        with pytest.MonkeyPatch.context() as mp:
            outage.install(mp)
            summary, runs = run_flow(config)
        yield config, summary, runs, outage.seen, log_file
    finally:
        logger = logging.getLogger("alignflow")
        for handler in [h for h in logger.handlers if getattr(h, "baseFilename", None) == str(log_file)]:
            logger.removeHandler(handler)
            handler.close()


def _store(config: SelfImproveConfig) -> ArtifactStore:
    return ArtifactStore(config.paths.resolved().artifact_root, config.storage.options())


def test_flow_on_s3_survives_an_outage_during_a_stage(s3_run):
    config, summary, runs, seen, _ = s3_run
    assert {s: runs[s].state.name for s in STAGES} == dict.fromkeys(STAGES, "Completed")
    assert runs["judge"].run_count == 2  # failed with the server down, retried by Prefect
    assert summary["rounds"][0]["train_dpo"]["uri"].startswith(f"{config.paths.artifact_root}/train_dpo/")
    # while the server was back but before the retry: parts on S3, no manifest, not committed
    assert seen["committed"] is False and MANIFEST not in seen["objects"]
    assert {n for n in seen["files"] if n.startswith("part-")} <= seen["objects"]
    # the retry found every shard's part file and receipt on S3: it committed them, computing none
    store = _store(config)
    manifest = store.manifest("judge", seen["key"])
    assert set(manifest["files"]) == seen["files"]
    assert manifest["metrics"]["shards_resumed"] == manifest["metrics"]["shards"] >= 1
    assert seen["objects"] <= object_names(store, "judge", seen["key"])
    committed = store.committed()
    assert set(STAGES) <= {m["stage"] for m in committed}
    for m in committed:
        assert_intact(store, m)


def test_rerun_on_s3_is_all_cached(s3_run):
    config, summary, _, _, _ = s3_run
    again, runs = run_flow(config)
    assert again == summary
    assert {s: runs[s].state.name for s in STAGES} == dict.fromkeys(STAGES, "Cached")


def test_rerun_without_prefect_cache_is_served_from_s3(s3_run, monkeypatch):
    """With Prefect's cache refreshed every stage runs, finds its manifest on S3 and computes nothing."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    config, summary, _, _, log_file = s3_run
    store = _store(config)
    before = {m["uri"]: m["created_at"] for m in store.committed()}

    def no_commit(*_args, **_kwargs):
        pytest.fail("a stage recomputed instead of finding its artifact on S3")

    monkeypatch.setattr(ArtifactStore, "commit", no_commit)
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        again, runs = run_flow(config)
    assert again == summary
    assert {s: runs[s].state.name for s in STAGES} == dict.fromkeys(STAGES, "Completed")
    assert {m["uri"]: m["created_at"] for m in store.committed()} == before
    assert f"judge: cached {summary['rounds'][0]['judge']['uri']}" in log_file.read_text()


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in Path(root).rglob("*") if p.is_file()]


def test_credentials_are_nowhere_in_artifacts_prefect_or_logs(s3, s3_run):
    config, _, _, _, log_file = s3_run
    secrets = [ENV_IDENTITY.secret_key.encode(), ENV_IDENTITY.access_key.encode()]
    store = _store(config)
    objects = store.fs.find(s3.bucket)
    assert any(o.endswith(MANIFEST) for o in objects)
    for path in objects:
        data = store.fs.cat_file(path)
        assert not any(s in data for s in secrets), path
    paths = config.paths.resolved()
    local = _files_under(os.environ["PREFECT_HOME"], os.environ["PREFECT_LOCAL_STORAGE_PATH"], paths.home)
    assert log_file in local and "committed s3://" in log_file.read_text()
    # the search does read Prefect's database: the run's parameters are in it
    assert any(config.paths.artifact_root.encode() in p.read_bytes() for p in local if p.name.startswith("prefect.db"))
    for path in local:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
