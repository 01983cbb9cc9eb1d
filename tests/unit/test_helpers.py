"""tests/helpers.py: data from ../shared is required in CI and optional elsewhere."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped
from helpers import require_shared


def test_missing_shared_data_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=r"GENIES release not found at .*absent \(CI=true"):
        require_shared(tmp_path / "absent", "GENIES release")


def test_missing_shared_data_skips_outside_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="GENIES release not found"):
        require_shared(tmp_path / "absent", "GENIES release")


def test_present_shared_data_is_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_shared(tmp_path, "a folder") == tmp_path
