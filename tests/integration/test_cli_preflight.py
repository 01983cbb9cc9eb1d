"""Bad input is caught before Prefect starts a flow run (alignflow/preflight.py): the real
CLI in a subprocess prints one line naming the file, exits 2 and leaves no Prefect
database behind; --traceback shows the traceback the line hides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def alignflow(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # Prefect's home is --home's
    return subprocess.run(
        [sys.executable, "-m", "alignflow.cli", *args, "--home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_before_any_flow_run(done: subprocess.CompletedProcess, home: Path, expected: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), done.stderr
    assert done.stdout == ""
    assert not list((home / "prefect").rglob("*.db")), "a Prefect database was created: a flow run was started"


@pytest.fixture
def bad_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c", "reference": "d"}\n{"prompt": oops}\n')
    return path


def test_malformed_prompts_fail_in_one_line_before_the_flow_run(bad_prompts, tmp_path):
    done = alignflow("run", "self-improve", f"prompts={bad_prompts}", home=tmp_path / "home")
    assert_one_line_before_any_flow_run(done, tmp_path / "home", f"{bad_prompts}:3: bad JSON (Expecting value")


def test_traceback_flag_shows_what_the_line_hides(bad_prompts, tmp_path):
    done = alignflow("--traceback", "run", "self-improve", f"prompts={bad_prompts}", home=tmp_path / "home")
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr and "in read_jsonl" in done.stderr
    assert f"PromptFileError: {bad_prompts}:3: bad JSON" in done.stderr


def test_validation_prompts_that_are_training_prompts_fail_before_the_flow_run(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour.", "reference": "Red."}\n{"prompt": "Say hi.", "reference": "Hi."}\n')
    home = tmp_path / "home"
    done = alignflow("run", "self-improve", f"prompts={prompts}", f"validation_prompts={prompts}", home=home)
    expected = "validation_prompts: 2 of its prompts are also training prompts (e.g. 'Name a colour.')"
    assert_one_line_before_any_flow_run(done, home, expected)


def test_bad_preference_row_fails_before_the_gem_flow_run(tmp_path):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": ""}) + "\n")
    done = alignflow("run", "gem", f"train={{t: {train}}}", f"eval={{e: {train}}}", home=tmp_path / "home")
    assert_one_line_before_any_flow_run(done, tmp_path / "home", f"{train}:2: field 'chosen' (chosen) is not non-empty")


def test_sega_iterations_asking_for_more_prompts_than_the_pairs_have_fail_before_the_flow_run(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(3))
    )
    home = tmp_path / "home"
    done = alignflow("run", "gem", f"train={{t: {train}}}", f"eval={{e: {train}}}", "sega.batch_size=4", home=home)
    expected = "sega: an iteration samples 4 prompts (steps_per_iteration x batch_size x grad_accum)"
    assert_one_line_before_any_flow_run(done, home, expected + " but the training pairs have only 3 distinct prompts")


def test_genies_folder_without_distributions_fails_before_the_flow_run(tmp_path):
    empty = tmp_path / "genies"
    empty.mkdir()
    done = alignflow("run", "genies-eval", f"data_dir={empty}", home=tmp_path / "home")
    assert_one_line_before_any_flow_run(done, tmp_path / "home", f"{empty}: no distributions/ folder")
