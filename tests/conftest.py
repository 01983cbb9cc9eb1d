"""Shared fixtures: an isolated Prefect home (set before Prefect is imported), a
tiny random Llama with a real byte-level BPE tokenizer, the GENIES test data.
What tests import (builders, configs, runners) lives in helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="alignflow-tests-"))
os.environ["ALIGNFLOW_HOME"] = str(_SESSION_HOME / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "prefect" / "results")
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # a fresh database on 2 cores
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
from helpers import GENIES_SHARED, GENIES_TEST_DISTRIBUTIONS, build_tiny_model, require_shared  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(_SESSION_HOME / "tiny-llama")


@pytest.fixture(scope="session")
def genies_tar() -> Path:
    return require_shared(GENIES_SHARED / "genies-datasets.tar.gz", "GENIES release")


@pytest.fixture(scope="session")
def genies_data_dir(genies_tar, tmp_path_factory) -> Path:
    """A folder holding distributions/<name>/{train,test,metadata}.json for a few real distributions."""
    import tarfile

    out = tmp_path_factory.mktemp("genies-data")
    wanted = tuple(f"distributions/{name}/" for name in GENIES_TEST_DISTRIBUTIONS)
    with tarfile.open(genies_tar, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
        tar.extractall(out, members=members, filter="data")
    return out
