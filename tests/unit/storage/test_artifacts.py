"""The content-addressed artifact store (storage/artifacts.py) on a local tmp_path root."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.storage.artifacts import MANIFEST, ArtifactError, ArtifactRef, ArtifactStore, artifact_key


def _table(values=(1, 2, 3)):
    return pa.table({"id": list(values), "text": [f"row {v}" for v in values]})


def _parent(content_hash="c" * 64):
    return ArtifactRef(stage="sample", key="k0", uri="file:///x/sample/k0", content_hash=content_hash)


def test_commit_then_read_back(tmp_path):
    store = ArtifactStore(str(tmp_path))
    parent = _parent()
    ref = store.commit(
        "judge",
        "key1",
        tables=[_table()],
        parents=[parent],
        config={"mode": "refeval"},
        code_version="v1",
        metrics={"rows_out": 3},
    )
    assert (ref.stage, ref.key) == ("judge", "key1")
    assert ref.uri == f"{tmp_path}/judge/key1"
    assert store.is_committed("judge", "key1")
    assert store.read_table(ref).equals(_table())
    assert store.read_rows(ref) == [{"id": 1, "text": "row 1"}, {"id": 2, "text": "row 2"}, {"id": 3, "text": "row 3"}]
    assert store.ref("judge", "key1") == ref


def test_manifest_fields(tmp_path):
    store = ArtifactStore(str(tmp_path))
    parent = _parent()
    ref = store.commit(
        "judge",
        "key1",
        tables=[_table(), _table([4, 5])],
        parents=[parent],
        config={"mode": "refeval", "k": 5},
        code_version="v1",
        metrics={"rows_out": 5},
    )
    m = store.manifest("judge", "key1")
    assert m["stage"] == "judge" and m["key"] == "key1"
    assert m["rows"] == 5
    assert m["content_hash"] == ref.content_hash and len(m["content_hash"]) == 64
    assert m["parents"] == [parent.model_dump(exclude={"uri"})]  # no path of the machine that wrote it
    assert m["config"] == {"mode": "refeval", "k": 5}
    assert m["code_version"] == "v1" and m["metrics"] == {"rows_out": 5}
    assert len(m["parts"]) == 2 and all(p in m["files"] for p in m["parts"])
    assert "id: int64" in m["schema"]
    # the manifest is on disk, next to the part files it lists
    on_disk = json.loads((tmp_path / "judge" / "key1" / MANIFEST).read_text())
    assert on_disk == m
    assert all((tmp_path / "judge" / "key1" / p).is_file() for p in m["parts"])
    assert store.read_table(ref).num_rows == 5


def test_same_content_two_writers_same_key(tmp_path):
    first = ArtifactStore(str(tmp_path)).commit("pairs", "k", tables=[_table()], config={"a": 1})
    second = ArtifactStore(str(tmp_path)).commit("pairs", "k", tables=[_table()], config={"a": 1})
    assert first.content_hash == second.content_hash
    assert first == second
    # both writers' part files exist; the manifest (the last one) names only its own, and is readable by either ref
    parts = sorted(p.name for p in (tmp_path / "pairs" / "k").glob("part-*.parquet"))
    assert len(parts) == 2
    store = ArtifactStore(str(tmp_path))
    assert len(store.manifest("pairs", "k")["parts"]) == 1
    assert store.read_table(first).equals(_table())
    assert store.read_table(second).equals(_table())


def test_different_content_different_hash(tmp_path):
    store = ArtifactStore(str(tmp_path))
    a = store.commit("pairs", "k1", tables=[_table([1, 2])])
    b = store.commit("pairs", "k2", tables=[_table([1, 3])])
    c = store.commit("pairs", "k3", tables=[_table([1, 2])])
    assert a.content_hash != b.content_hash
    assert a.content_hash == c.content_hash  # content-addressed: the key and writer do not enter


def test_uncommitted_artifact(tmp_path):
    store = ArtifactStore(str(tmp_path))
    # a killed writer: a part file but no manifest
    directory = tmp_path / "sample" / "dead"
    directory.mkdir(parents=True)
    pq.write_table(_table(), directory / "part-00000-abc.parquet")
    assert store.is_committed("sample", "dead") is False
    assert store.is_committed("sample", "never") is False
    with pytest.raises(ArtifactError) as err:
        store.manifest("sample", "dead")
    assert store.uri("sample", "dead") in str(err.value)
    assert f"{tmp_path}/sample/dead" in str(err.value) and "never committed" in str(err.value)
    with pytest.raises(ArtifactError, match="never committed"):
        store.ref("sample", "dead")
    ghost = ArtifactRef(stage="sample", key="dead", uri=store.uri("sample", "dead"), content_hash="0" * 64)
    with pytest.raises(ArtifactError, match="sample/dead"):
        store.read_table(ghost)


@pytest.fixture
def committed_part(tmp_path):
    """(store, ref, path of its one Parquet part) for a freshly committed artifact."""
    store = ArtifactStore(str(tmp_path))
    ref = store.commit("judge", "k", tables=[_table()])
    return store, ref, tmp_path / "judge" / "k" / store.manifest("judge", "k")["parts"][0]


def test_tampered_part_file_is_rejected(committed_part):
    store, ref, part = committed_part
    pq.write_table(_table([7, 8, 9]), part)  # still valid Parquet, different content
    with pytest.raises(ArtifactError, match="content hash") as err:
        store.read_table(ref)
    assert part.name in str(err.value)
    # verification can be switched off explicitly, which then returns the rewritten rows
    assert store.read_table(ref, verify=False).column("id").to_pylist() == [7, 8, 9]


def test_truncated_part_file_is_rejected(committed_part):
    store, ref, part = committed_part
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="content hash"):
        store.read_table(ref)


def test_missing_part_file_is_reported(committed_part):
    store, ref, part = committed_part
    part.unlink()
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        store.read_table(ref)


def test_stale_ref_after_rewrite_is_rejected(tmp_path):
    store = ArtifactStore(str(tmp_path))
    old = store.commit("judge", "k", tables=[_table([1])])
    new = store.commit("judge", "k", tables=[_table([2])])
    assert old.content_hash != new.content_hash
    with pytest.raises(ArtifactError, match="does not match"):
        store.read_table(old)
    assert store.read_rows(new) == [{"id": 2, "text": "row 2"}]


def test_corrupt_manifest(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.commit("judge", "k", tables=[_table()])
    (tmp_path / "judge" / "k" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        store.manifest("judge", "k")


def test_local_dirs_are_committed_and_hashed(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01\x02")
    store = ArtifactStore(str(tmp_path / "root"))
    ref = store.commit("train_dpo", "k", tables=[_table()], local_dirs={"merged": src})
    local = store.local_dir(ref, "merged", tmp_path / "cache")
    assert (Path(local) / "config.json").read_text() == '{"a": 1}'
    assert (Path(local) / "sub" / "w.bin").read_bytes() == b"\x00\x01\x02"
    with pytest.raises(ArtifactError, match="has no 'adapter' directory"):
        store.local_dir(ref, "adapter", tmp_path / "cache")
    # a second commit of the same files hashes the same, though the stored directory name differs
    again = ArtifactStore(str(tmp_path / "root2")).commit(
        "train_dpo", "k", tables=[_table()], local_dirs={"merged": src}
    )
    assert again.content_hash == ref.content_hash


def test_checkpoints_newest_first_and_not_committed(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for step in (5, 10, 15):
        store.save_checkpoint("train_dpo", "k", step, f"state {step}".encode())
    paths = store.checkpoints("train_dpo", "k")
    assert [store.read_bytes(p) for p in paths] == [b"state 15", b"state 10", b"state 5"]
    assert store.is_committed("train_dpo", "k") is False


def test_list_and_find(tmp_path):
    store = ArtifactStore(str(tmp_path))
    a = store.commit("sample", "abc123", tables=[_table()])
    store.commit("judge", "abd456", tables=[_table([9])])
    assert {m["key"] for m in store.committed()} == {"abc123", "abd456"}
    assert store.find("abc") == a
    with pytest.raises(ArtifactError, match="2 artifacts"):
        store.find("ab")
    with pytest.raises(ArtifactError, match="no artifact"):
        store.find("zzz")


# -- artifact_key -----------------------------------------------------------------------------


def test_artifact_key_is_stable_and_sensitive_to_its_inputs():
    parent = _parent("a" * 64)
    base = artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [parent], "v1")
    assert len(base) == 20 and all(c in "0123456789abcdef" for c in base)
    # not otherwise: same inputs, dict key order, a parent with another uri/key but the same content
    assert artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [parent], "v1") == base
    assert artifact_key("judge", {"top_logprobs": 5, "mode": "refeval"}, [parent], "v1") == base
    moved = ArtifactRef(stage="sample", key="other", uri="s3://bucket/sample/other", content_hash="a" * 64)
    assert artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [moved], "v1") == base
    # changes with each input
    changed = {
        "config": artifact_key("judge", {"mode": "refeval", "top_logprobs": 6}, [parent], "v1"),
        "config key": artifact_key("judge", {"mode": "refeval"}, [parent], "v1"),
        "parent": artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [_parent("b" * 64)], "v1"),
        "no parent": artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [], "v1"),
        "code": artifact_key("judge", {"mode": "refeval", "top_logprobs": 5}, [parent], "v2"),
        "stage": artifact_key("pairs", {"mode": "refeval", "top_logprobs": 5}, [parent], "v1"),
    }
    assert all(v != base for v in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_artifact_key_parent_order_matters():
    p1, p2 = _parent("1" * 64), _parent("2" * 64)
    assert artifact_key("pairs", {}, [p1, p2], "v") != artifact_key("pairs", {}, [p2, p1], "v")


# -- shards ------------------------------------------------------------------------
def test_shards_written_by_many_writers_commit_to_the_one_writer_artifact(tmp_path):
    """Part files from separate writers (Ray actors), in any order, hash like one writer's commit."""
    store = ArtifactStore(str(tmp_path))
    store.plan_shards("sample", "k1", shards=2, work=5, unit="rows")
    second = store.write_shard("sample", "k1", 1, _table([4, 5]), work=2)
    first = store.write_shard("sample", "k1", 0, pa.table({"id": [1, 2, 3], "text": [None, None, None]}), work=3)
    assert not store.is_committed("sample", "k1")
    assert [(p["stage"], p["shards_done"], p["work_done"]) for p in store.in_progress()] == [("sample", 2, 5)]

    ref = store.commit("sample", "k1", shards=[first, second])
    assert store.in_progress() == []
    assert store.read_rows(ref)[2:] == [{"id": 3, "text": None}, {"id": 4, "text": "row 4"}, {"id": 5, "text": "row 5"}]
    one_writer = store.commit(
        "sample", "k2", tables=[pa.table({"id": [1, 2, 3], "text": [None, None, None]}), _table([4, 5])]
    )
    assert ref.content_hash == one_writer.content_hash
    assert store.manifest("sample", "k1")["parts"] == [first["part"], second["part"]]


def test_a_receipt_whose_part_file_is_gone_is_not_a_written_shard(tmp_path):
    store = ArtifactStore(str(tmp_path))
    kept = store.write_shard("sample", "k1", 0, _table([1]), work=1)
    lost = store.write_shard("sample", "k1", 1, _table([2]), work=1)
    (tmp_path / "sample" / "k1" / lost["part"]).unlink()
    assert store.shard_receipts("sample", "k1") == {0: kept}


def test_a_tampered_shard_is_caught_before_it_is_committed(tmp_path):
    store = ArtifactStore(str(tmp_path))
    receipt = store.write_shard("sample", "k1", 0, _table([1, 2]), work=2)
    pq.write_table(_table([9, 9]), tmp_path / "sample" / "k1" / receipt["part"])
    with pytest.raises(ArtifactError, match="content hash does not match the shard receipt"):
        store.read_shards("sample", "k1", [receipt])
