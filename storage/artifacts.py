"""The artifact store: content-addressed stage outputs on any fsspec root.

An artifact is ``{root}/{stage}/{key}/`` holding Parquet part files and/or a
model directory, plus ``_manifest.json``. The manifest is written last and
lists every file with its hash, so a killed writer leaves files without a
manifest: not committed, never read. Two writers of the same key write their
own part files (unique names) and each commits a manifest naming only its own
files, so whichever manifest lands last describes an intact artifact.

A sharded stage writes its plan (how many shards) and then one part file per
shard as each shard finishes, with a receipt, under ``_shards/``; the manifest that commits them comes only when every
shard is in. A retried stage finds the receipts and computes only the missing
shards. The content hash ignores the writer ids in file names, so the same rows
hash the same however many processes wrote them.

On object stores (s3://) there is no rename and none is needed: an object PUT
(multipart ones included) becomes visible whole or not at all, so the
manifest's single PUT is the commit. Files are never overwritten or deleted,
so a manifest's files stay readable after another writer's manifest replaces it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from alignflow.storage.s3 import open_options, refuse_credentials_in_url

MANIFEST = "_manifest.json"
CHECKPOINTS = "_checkpoints"
SHARDS = "_shards"
_WRITER_ID = re.compile(r"-[0-9a-f]{10}(?=\.parquet$|/)")  # a writer's id in a part file or directory name


class ArtifactError(RuntimeError):
    """A missing, uncommitted or corrupt artifact."""


class ArtifactRef(BaseModel):
    """What tasks pass to each other: where an artifact is and what it holds."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    uri: str
    content_hash: str


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys (configs, key material)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def artifact_key(stage: str, config: dict, parents: list[ArtifactRef], code_version: str) -> str:
    """key = hash(stage, its config, its parents' content hashes, its code version)."""
    material = {
        "stage": stage,
        "config": config,
        "parents": [p.content_hash for p in parents],
        "code": code_version,
    }
    return stable_hash(material)[:20]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Reads and commits artifacts under one fsspec root (local dir, s3://, ...)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        """``storage_options``: fsspec options without credentials; for s3 roots they may name an
        ``endpoint_url`` and a ``credentials_block`` (see storage/s3.py)."""
        refuse_credentials_in_url(root)
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **open_options(self.root, self.storage_options))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols

    # -- addressing ---------------------------------------------------------
    def uri(self, stage: str, key: str, *parts: str) -> str:
        return "/".join([self.root, stage, key, *parts])

    def _path(self, stage: str, key: str, *parts: str) -> str:
        return "/".join([self._root_path, stage, key, *parts])

    def ref(self, stage: str, key: str) -> ArtifactRef:
        manifest = self.manifest(stage, key)
        return ArtifactRef(stage=stage, key=key, uri=self.uri(stage, key), content_hash=manifest["content_hash"])

    # -- reading ------------------------------------------------------------
    def is_committed(self, stage: str, key: str) -> bool:
        return self.fs.exists(self._path(stage, key, MANIFEST))

    def manifest(self, stage: str, key: str) -> dict:
        path = self._path(stage, key, MANIFEST)
        try:
            return json.loads(self.read_bytes(path))
        except FileNotFoundError:
            raise ArtifactError(
                f"{self.uri(stage, key)}: no {MANIFEST}: the artifact was never committed "
                "(its stage did not finish) or was deleted; re-run the flow to rebuild it"
            ) from None
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{self.uri(stage, key, MANIFEST)}: corrupt manifest ({e})") from None

    def read_table(self, ref: ArtifactRef, verify: bool = True) -> pa.Table:
        manifest = self._manifest_for(ref)
        tables = []
        for name in manifest["parts"]:
            data = self._read_listed_file(ref, manifest, name, verify)
            tables.append(pq.read_table(io.BytesIO(data)))
        return _concat(tables)

    def read_rows(self, ref: ArtifactRef) -> list[dict]:
        return self.read_table(ref).to_pylist()

    def _manifest_for(self, ref: ArtifactRef) -> dict:
        manifest = self.manifest(ref.stage, ref.key)
        if manifest["content_hash"] != ref.content_hash:
            raise ArtifactError(
                f"{ref.uri}: manifest content hash {manifest['content_hash'][:12]} does not match "
                f"the expected {ref.content_hash[:12]} (the artifact was rewritten by another run)"
            )
        return manifest

    def _read_listed_file(self, ref: ArtifactRef, manifest: dict, name: str, verify: bool) -> bytes:
        return self._read_checked(ref.stage, ref.key, name, manifest["files"][name] if verify else None, "manifest")

    def _read_checked(self, stage: str, key: str, name: str, sha256: str | None, listed_in: str) -> bytes:
        try:
            data = self.read_bytes(self._path(stage, key, name))
        except FileNotFoundError:
            raise ArtifactError(f"{self.uri(stage, key, name)}: listed in the {listed_in} but missing") from None
        if sha256 is not None and _sha256_bytes(data) != sha256:
            raise ArtifactError(
                f"{self.uri(stage, key, name)}: content hash does not match the {listed_in} "
                "(file corrupted or overwritten); delete the artifact directory and re-run"
            )
        return data

    def read_shards(self, stage: str, key: str, receipts: list[dict]) -> pa.Table:
        """The rows of written, not yet committed shards, checked against their receipts."""
        tables = [
            pq.read_table(io.BytesIO(self._read_checked(stage, key, r["part"], r["sha256"], "shard receipt")))
            for r in receipts
        ]
        return _concat(tables)

    def local_dir(self, ref: ArtifactRef, subdir: str, cache_root: str | Path) -> Path:
        """A local directory holding ``subdir`` of an artifact (downloaded once if remote)."""
        manifest = self._manifest_for(ref)
        stored = manifest["dirs"].get(subdir)
        if stored is None:
            raise ArtifactError(f"{ref.uri}: has no '{subdir}' directory (has: {sorted(manifest['dirs'])})")
        if self.is_local:
            return Path(self._path(ref.stage, ref.key, stored))
        target = Path(cache_root) / ref.content_hash[:20] / subdir
        if not (target / ".complete").exists():
            for name in [n for n in manifest["files"] if n.startswith(stored + "/")]:
                dest = target / name[len(stored) + 1 :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self._read_listed_file(ref, manifest, name, verify=True))
            (target / ".complete").touch()
        return target

    # -- writing ------------------------------------------------------------
    def commit(
        self,
        stage: str,
        key: str,
        *,
        tables: Sequence[pa.Table] = (),
        shards: Sequence[dict] = (),
        local_dirs: dict[str, Path] | None = None,
        parents: Sequence[ArtifactRef] = (),
        config: dict | None = None,
        code_version: str = "",
        metrics: dict | None = None,
        schema: pa.Schema | None = None,
    ) -> ArtifactRef:
        """Write parts, then the manifest. Only the manifest makes the artifact visible.
        ``shards``: receipts of part files already written by ``write_shard``, in order.
        ``schema``: the stage's declared output rows; every table is checked and written in it."""
        if schema is not None:
            tables = [conform(table, schema, stage) for table in tables]
        writer = uuid.uuid4().hex[:10]
        receipts = [*shards, *(self._write_part(stage, key, i, table, writer) for i, table in enumerate(tables))]
        files = {r["part"]: r["sha256"] for r in receipts}
        parts = [r["part"] for r in receipts]
        rows = sum(r["rows"] for r in receipts)
        written = next((r["schema"] for r in receipts if r["schema"]), None)
        schema_text = schema.to_string() if schema is not None else written
        dirs = {subdir: f"{subdir}-{writer}" for subdir in (local_dirs or {})}
        for subdir, local in (local_dirs or {}).items():
            for path in sorted(Path(local).rglob("*")):
                if path.is_file():
                    name = f"{dirs[subdir]}/{path.relative_to(local).as_posix()}"
                    files[name] = self._write_bytes(stage, key, name, path.read_bytes())
        manifest = {
            "stage": stage,
            "key": key,
            "parts": parts,
            "files": files,
            "dirs": dirs,
            "rows": rows,
            "schema": schema_text,
            "content_hash": _content_hash(files),
            "parents": [p.model_dump(exclude={"uri"}) for p in parents],  # a uri names the writer's machine
            "config": config or {},
            "code_version": code_version,
            "metrics": metrics or {},
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        self._write_manifest(stage, key, manifest)
        return ArtifactRef(stage=stage, key=key, uri=self.uri(stage, key), content_hash=manifest["content_hash"])

    def _write_part(self, stage: str, key: str, index: int, table: pa.Table, writer: str) -> dict:
        name = f"part-{index:05d}-{writer}.parquet"
        return {
            "part": name,
            "sha256": self._write_bytes(stage, key, name, _parquet_bytes(table)),
            "rows": table.num_rows,
            "schema": table.schema.to_string() if table.num_columns else None,
        }

    def write_shard(
        self, stage: str, key: str, index: int, table: pa.Table, schema: pa.Schema | None = None, **info
    ) -> dict:
        """Write shard ``index``'s part file, in the stage's declared ``schema``, and its receipt
        (``info`` rides along: who computed it, how long it took); the artifact stays uncommitted."""
        if schema is not None:
            table = conform(table, schema, stage)
        receipt = {"index": index, **self._write_part(stage, key, index, table, uuid.uuid4().hex[:10]), **info}
        self._write_atomic(self._path(stage, key, SHARDS, f"shard-{index:05d}.json"), json.dumps(receipt).encode())
        return receipt

    def plan_shards(self, stage: str, key: str, **plan) -> None:
        """Record what a sharded stage is about to compute (shards, work, unit), for ``in_progress``."""
        self._write_atomic(self._path(stage, key, SHARDS, "plan.json"), json.dumps(plan).encode())

    def in_progress(self) -> list[dict]:
        """Sharded stages started and not committed: their plan and the shards written so far."""
        out = []
        for path in sorted(self.fs.glob(f"{self._root_path}/*/*/{SHARDS}/plan.json")):
            stage, key = path.split("/")[-4:-2]
            if self.is_committed(stage, key):
                continue
            receipts = self.shard_receipts(stage, key).values()
            out.append(
                {
                    "stage": stage,
                    "key": key,
                    **json.loads(self.read_bytes(path)),
                    "shards_done": len(receipts),
                    "work_done": sum(r["work"] for r in receipts),
                }
            )
        return out

    def shard_receipts(self, stage: str, key: str) -> dict[int, dict]:
        """The shards an earlier, unfinished attempt at this artifact already wrote."""
        receipts = {}
        for path in self.fs.glob(self._path(stage, key, SHARDS, "shard-*.json")):
            receipt = json.loads(self.read_bytes(path))
            if self.fs.exists(self._path(stage, key, receipt["part"])):
                receipts[receipt["index"]] = receipt
        return receipts

    def _write_bytes(self, stage: str, key: str, name: str, data: bytes) -> str:
        path = self._path(stage, key, name)
        self._make_parent(path)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return _sha256_bytes(data)

    def _write_manifest(self, stage: str, key: str, manifest: dict) -> None:
        self._write_atomic(self._path(stage, key, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())

    def _write_atomic(self, final: str, data: bytes) -> None:
        self._make_parent(final)
        if self.is_local:  # rename is atomic on a local filesystem; object PUTs are atomic anyway
            tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        else:
            with self.fs.open(final, "wb") as f:
                f.write(data)

    def _make_parent(self, path: str) -> None:
        # Object stores have no directories; s3fs's makedirs would probe (and even create) the bucket.
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def committed(self) -> list[dict]:
        """Every committed artifact's manifest, newest first."""
        out = []
        for path in self.fs.glob(f"{self._root_path}/*/*/{MANIFEST}"):
            manifest = json.loads(self.read_bytes(path))
            manifest["uri"] = self.uri(manifest["stage"], manifest["key"])
            out.append(manifest)
        return sorted(out, key=lambda m: m["created_at"], reverse=True)

    def find(self, key_prefix: str) -> ArtifactRef:
        matches = [m for m in self.committed() if m["key"].startswith(key_prefix)]
        if len(matches) != 1:
            found = "no artifact" if not matches else f"{len(matches)} artifacts"
            raise ArtifactError(f"{found} with key starting '{key_prefix}' under {self.root}")
        return self.ref(matches[0]["stage"], matches[0]["key"])

    # -- checkpoints of resumable stages (never part of the committed artifact) --
    def save_checkpoint(self, stage: str, key: str, step: int, data: bytes) -> str:
        path = self._path(stage, key, CHECKPOINTS, f"step-{step:08d}.pt")
        self._write_atomic(path, data)
        return path

    def checkpoints(self, stage: str, key: str) -> list[str]:
        """Checkpoint paths of an uncommitted stage, newest first."""
        return sorted(self.fs.glob(self._path(stage, key, CHECKPOINTS, "step-*.pt")), reverse=True)

    def read_bytes(self, path: str) -> bytes:
        # One GET: s3fs's file objects read in ranges pinned to the ETag seen first, and fail
        # (FileExpired) when another writer replaces a manifest between the two.
        return self.fs.cat_file(path)


def _content_hash(files: dict[str, str]) -> str:
    """Hash of the contents under writer-independent names, so a rebuild hashes the same."""
    return stable_hash(sorted((_WRITER_ID.sub("", name, count=1), digest) for name, digest in files.items()))


def conform(table: pa.Table, schema: pa.Schema, stage: str) -> pa.Table:
    """``table`` in its stage's declared ``schema``: columns in the declared order, each
    cast where nothing can be lost (a column of nulls inferred from empty lists, int to
    float); a missing, extra or differently typed column is an ArtifactError."""
    if table.num_rows == 0 and table.num_columns == 0:  # no rows at all: from_pylist([]) has no columns either
        return schema.empty_table()
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        found = table.schema.field(extra[0]).type
        raise ArtifactError(
            f"{stage}: output column '{extra[0]}' ({found}) is not in the stage's declared schema "
            f"(expected columns: {', '.join(schema.names)})"
        )
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            raise ArtifactError(f"{stage}: output column '{field.name}' is missing (expected {field.type})")
        column = table.column(field.name)
        if not _widens_to(column.type, field.type):
            raise ArtifactError(f"{stage}: output column '{field.name}' should be {field.type}, found {column.type}")
        if not field.nullable and column.null_count:
            raise ArtifactError(f"{stage}: output column '{field.name}' ({field.type}) holds {column.null_count} nulls")
        try:
            columns.append(column.cast(field.type, safe=True))
        except pa.ArrowInvalid as e:  # an int too large for a narrower declared int
            raise ArtifactError(f"{stage}: output column '{field.name}' does not fit {field.type} ({e})") from None
    return pa.Table.from_arrays(columns, schema=schema)


def _widens_to(found: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column inferred as ``found`` may be written as ``expected`` without a
    change of meaning: never text to numbers or numbers to text."""
    if found == expected or pa.types.is_null(found):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if pa.types.is_integer(found) and any(is_kind(expected) for is_kind in numeric):
        return True
    if pa.types.is_floating(found) and pa.types.is_floating(expected):
        return True
    if pa.types.is_list(found) and pa.types.is_list(expected):
        return _widens_to(found.value_type, expected.value_type)
    return False


def _concat(tables: list[pa.Table]) -> pa.Table:
    # shards infer their types alone: a column all null in one shard is a string in another
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
