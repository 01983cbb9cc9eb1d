"""GENIES data (genies/data.py) and the shift registry (genies/shifts.py): record
validation, position-shuffled pairs, safe download/extraction, shift specs."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import GENIES_SHARED, require_shared

from alignflow.genies.data import (
    GeniesDataError,
    capped,
    distribution_dir,
    distribution_names,
    download,
    expand_pairs,
    one_pair_per_prompt,
    preferred_texts,
    read_split,
    record_problem,
    validate_release,
)
from alignflow.genies.shifts import GENIES, Shift, check_distributions, distributions_needed, load_shifts

SHIFT_SPECS = GENIES_SHARED / "distribution_shifts"

GOOD = {"prompt": "Q?", "responses": {"right": 1.0, "wrong": 0.0}}
FOUR = {"prompt": "Pick one.", "responses": {"w1": 0.0, "right": 1.0, "w2": 0.0, "w3": 0.0}}


# -- records -------------------------------------------------------------------
def test_good_record_has_no_problem():
    assert record_problem(GOOD) is None
    assert record_problem(FOUR) is None
    assert record_problem({**GOOD, "prompt_format": "{x}", "extra": 3}) is None  # other fields are ignored


@pytest.mark.parametrize(
    "record,expected",
    [
        ({"prompt": "Q", "responses": {"a": 1.0, "b": 1.0, "c": 0.0}}, "2 preferred"),
        ({"prompt": "Q", "responses": {"a": 0.0, "b": 0.0}}, "0 preferred"),
        ({"prompt": "Q", "responses": {"a": 1.0}}, "no dispreferred"),
        ({"prompt": "", "responses": {"a": 1.0, "b": 0.0}}, "empty or missing 'prompt'"),
        ({"prompt": "  \n", "responses": {"a": 1.0, "b": 0.0}}, "empty or missing 'prompt'"),
        ({"responses": {"a": 1.0, "b": 0.0}}, "empty or missing 'prompt'"),
        ({"prompt": "Q"}, "missing 'responses'"),
        ({"prompt": "Q", "responses": {}}, "missing 'responses'"),
        ({"prompt": "Q", "responses": {"a": 1.0, "b": 0.5}}, "labels must be 1.0 or 0.0"),
        ({"prompt": "Q", "responses": {"a": True, "b": False}}, "labels must be 1.0 or 0.0"),
        (["Q", "a"], "expected a JSON object, got list"),
        ("Q", "expected a JSON object, got str"),
    ],
)
def test_bad_records_say_why(record, expected):
    assert expected in record_problem(record)


def test_read_split_names_the_file_and_the_record(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD, {"prompt": "Q", "responses": {"a": 1.0, "b": 1.0}}]))
    with pytest.raises(GeniesDataError) as e:
        read_split(tmp_path, "train")
    assert (
        str(e.value)
        == f"{tmp_path / 'train.json'}: record 2: 2 preferred responses (expected exactly one labelled 1.0)"
    )


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "file not found"),
        ("[{]", "not valid JSON"),
        ('{"prompt": "Q"}', "expected a JSON list of records, got dict"),
    ],
)
def test_read_split_bad_files(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "test.json").write_text(content)
    with pytest.raises(GeniesDataError, match=expected) as e:
        read_split(tmp_path, "test")
    assert str(tmp_path / "test.json") in str(e.value)


def test_read_split_reads_a_real_distribution(genies_data_dir):
    records = read_split(genies_data_dir / "distributions" / "alpaca_short", "train")
    assert len(records) == 600 and all(record_problem(r) is None for r in records)


# -- pairs ---------------------------------------------------------------------
def test_expand_pairs_one_pair_per_dispreferred_response():
    pairs = expand_pairs([GOOD, FOUR], seed=0, distribution="d", split="train")
    assert [p["pair_id"] for p in pairs] == ["d/train/0/0", "d/train/1/0", "d/train/1/1", "d/train/1/2"]
    assert [p["record"] for p in pairs] == [0, 1, 1, 1]
    four = pairs[1:]
    for pair in pairs:
        sides = (pair["response_a"], pair["response_b"])
        assert pair["preferred"] in (0, 1)
        assert sides[pair["preferred"]] == "right"
        assert sides[1 - pair["preferred"]] != "right"
    assert sorted(p["response_b" if p["preferred"] == 0 else "response_a"] for p in four) == ["w1", "w2", "w3"]
    assert {p["prompt"] for p in four} == {"Pick one."}


@pytest.mark.parametrize("name", ["arc_easy", "alpaca_long"])
def test_positions_are_shuffled_where_the_file_always_lists_the_preferred_first(genies_data_dir, name):
    records = read_split(genies_data_dir / "distributions" / name, "train")
    assert all(next(iter(r["responses"].values())) == 1 for r in records)  # the file: preferred always first
    pairs = expand_pairs(records, seed=0, distribution=name, split="train")
    assert len(pairs) == sum(len(r["responses"]) - 1 for r in records)
    share_a = sum(p["preferred"] == 0 for p in pairs) / len(pairs)
    assert 0.35 < share_a < 0.65, share_a
    by_id = {p["pair_id"]: p for p in pairs}
    for index in (0, 17, len(records) - 1):
        record = records[index]
        preferred = next(t for t, v in record["responses"].items() if v == 1)
        pair = by_id[f"{name}/train/{index}/0"]
        assert (pair["response_a"], pair["response_b"])[pair["preferred"]] == preferred


def test_shuffle_is_deterministic_for_a_seed(genies_data_dir):
    records = read_split(genies_data_dir / "distributions" / "arc_easy", "test")
    first = expand_pairs(records, seed=0, distribution="arc_easy", split="test")
    assert expand_pairs(records, seed=0, distribution="arc_easy", split="test") == first
    other = expand_pairs(records, seed=7, distribution="arc_easy", split="test")
    assert [p["pair_id"] for p in other] == [p["pair_id"] for p in first]
    assert [p["preferred"] for p in other] != [p["preferred"] for p in first]


def test_shuffle_changes_with_the_seed(genies_data_dir):
    records = read_split(genies_data_dir / "distributions" / "arc_easy", "test")
    first = expand_pairs(records, seed=0, distribution="arc_easy", split="test")
    for seed in (1, 2):
        other = expand_pairs(records, seed=seed, distribution="arc_easy", split="test")
        flipped = sum(a["preferred"] != b["preferred"] for a, b in zip(first, other))
        # an independent draw per pair: about half the 750 pairs change side (crc32 parity flipped none)
        assert 0.4 * len(first) < flipped < 0.6 * len(first), (seed, flipped)


def test_pairs_of_one_record_are_placed_independently(genies_data_dir):
    records = read_split(genies_data_dir / "distributions" / "arc_easy", "train")
    sides: dict[int, list[int]] = {}
    for pair in expand_pairs(records, seed=0, distribution="arc_easy", split="train"):
        sides.setdefault(pair["record"], []).append(pair["preferred"])
    # 3 independent coin flips agree with probability 1/4 (crc32 parity put every record's pairs on one side)
    agree = sum(len(set(s)) == 1 for s in sides.values()) / len(sides)
    assert 0.15 < agree < 0.35, agree


def test_capped_is_a_seeded_subset_in_file_order(genies_data_dir):
    records = read_split(genies_data_dir / "distributions" / "arc_easy", "test")
    pairs = expand_pairs(records, seed=0, distribution="arc_easy", split="test")
    assert len(pairs) == 750
    kept = capped(pairs, 40, seed=0)
    assert len(kept) == 40
    assert capped(pairs, 40, seed=0) == kept
    position = {p["pair_id"]: i for i, p in enumerate(pairs)}
    assert [position[p["pair_id"]] for p in kept] == sorted(position[p["pair_id"]] for p in kept)
    assert all(p in pairs for p in kept)
    assert {p["pair_id"] for p in capped(pairs, 40, seed=1)} != {p["pair_id"] for p in kept}
    assert capped(pairs, None, seed=0) is pairs and capped(pairs, 750, seed=0) == pairs
    assert capped(pairs[:3], 5, seed=0) == pairs[:3]


# -- download ------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _release(root: Path, records: dict[str, dict[str, list]]) -> Path:
    """A hand-made release: records[name][split] -> distributions/<name>/<split>.json."""
    for name, splits in records.items():
        folder = root / "distributions" / name
        folder.mkdir(parents=True)
        for split, rows in splits.items():
            (folder / f"{split}.json").write_text(json.dumps(rows))
    return root


def test_download_from_the_real_release_tar(genies_tar, tmp_path):
    dest = download(str(genies_tar), tmp_path / "genies")
    names = distribution_names(dest)
    assert len(names) == 66
    assert {"alpaca_short", "alpaca_long", "alpaca_mmlu", "arc_easy", "quote_attribution"} <= set(names)
    for name in ("alpaca_short", "quote_attribution"):
        assert sorted(p.name for p in distribution_dir(dest, name).iterdir()) == [
            "metadata.json",
            "test.json",
            "train.json",
        ]
    assert [p.name for p in dest.iterdir()] == ["distributions"]  # no staging folder left behind


def test_validate_release_on_real_distributions(genies_data_dir):
    checked, bad = validate_release(genies_data_dir)
    assert (checked, bad) == (4 * (600 + 250), [])


def test_download_from_a_directory_replaces_what_was_there(genies_data_dir, tmp_path):
    dest = tmp_path / "dest"
    (dest / "distributions" / "stale").mkdir(parents=True)
    download(str(genies_data_dir), dest)
    assert distribution_names(dest) == ["alpaca_long", "alpaca_mmlu", "alpaca_short", "arc_easy"]
    assert _tree(dest / "distributions") == _tree(genies_data_dir / "distributions")
    # a release wrapped in one more folder is found too
    wrapped = tmp_path / "wrapped"
    _release(wrapped / "genies-datasets", {"only": {"train": [GOOD], "test": [GOOD]}})
    download(str(wrapped), dest)
    assert distribution_names(dest) == ["only"]


def test_download_unknown_source_is_an_error(tmp_path):
    with pytest.raises(GeniesDataError, match="not found") as e:
        download(str(tmp_path / "nope.tar.gz"), tmp_path / "dest")
    assert "nope.tar.gz" in str(e.value)


@pytest.fixture
def existing(tmp_path) -> Path:
    """A destination that already holds a release: a failed download must leave it as it is."""
    return _release(tmp_path / "dest", {"keep": {"train": [GOOD], "test": [GOOD]}})


def test_corrupt_tar_names_the_file_and_leaves_dest_unchanged(tmp_path, existing):
    before = _tree(existing)
    bad = tmp_path / "release.tar.gz"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(GeniesDataError, match="not a readable tar archive") as e:
        download(str(bad), existing)
    assert str(bad) in str(e.value)
    assert _tree(existing) == before
    assert [p.name for p in existing.iterdir()] == ["distributions"]


def _evil_tar(path: Path, member: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        good = json.dumps([GOOD]).encode()
        for name in ("distributions/ok/train.json", "distributions/ok/test.json", member):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tar.addfile(info, io.BytesIO(good))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_tar_members_escaping_the_destination_are_refused(tmp_path, existing, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    member = "../evil.txt" if kind == "dotdot" else str(outside / "evil.txt")  # an absolute path outside dest
    archive = _evil_tar(tmp_path / f"{kind}.tar.gz", member)
    with tarfile.open(archive) as tar:
        assert tar.getnames()[-1] == member  # stored as written, not sanitised on the way in
    before = _tree(tmp_path)
    with pytest.raises(GeniesDataError, match="refusing to extract") as e:
        download(str(archive), existing)
    assert f"member '{member}'" in str(e.value) and str(archive) in str(e.value)
    assert ("'..'" if kind == "dotdot" else "absolute path") in str(e.value)
    assert _tree(tmp_path) == before  # nothing written anywhere, dest untouched
    assert not (tmp_path / "evil.txt").exists() and not (outside / "evil.txt").exists()
    assert [p.name for p in existing.iterdir()] == ["distributions"]


def test_tar_with_a_symlink_member_is_refused(tmp_path, existing):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("distributions/ok/train.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    before = _tree(existing)
    with pytest.raises(GeniesDataError, match="link or device"):
        download(str(archive), existing)
    assert _tree(existing) == before


def test_validate_release_lists_bad_records_with_distribution_split_and_index(tmp_path):
    two_preferred = {"prompt": "Q", "responses": {"a": 1.0, "b": 1.0, "c": 0.0}}
    root = _release(
        tmp_path,
        {
            "fine": {"train": [GOOD, FOUR], "test": [GOOD]},
            "broken": {
                "train": [GOOD, GOOD, two_preferred],
                "test": [GOOD, {"prompt": "", "responses": {"a": 1.0, "b": 0.0}}],
            },
            "half": {"train": [GOOD]},  # no test.json
        },
    )
    checked, bad = validate_release(root)
    assert checked == 3 + 5 + 1
    assert [(b.distribution, b.split, b.index) for b in bad] == [
        ("broken", "train", 2),
        ("broken", "test", 1),
        ("half", "test", -1),
    ]
    assert str(bad[0]) == "broken/train.json record 2: 2 preferred responses (expected exactly one labelled 1.0)"
    assert "file not found" in bad[2].problem


def test_download_cli_reports_bad_records(tmp_path, capsys):
    from alignflow.cli import main

    source = _release(
        tmp_path / "src", {"broken": {"train": [GOOD, {"prompt": "Q", "responses": {"a": 1.0}}], "test": [GOOD]}}
    )
    assert main(["genies", "download", "--source", str(source), "--dest", str(tmp_path / "dest")]) == 1
    out = capsys.readouterr().out
    assert "3 records checked, 1 bad" in out and "broken/train.json record 1: no dispreferred response" in out
    _release(tmp_path / "ok", {"fine": {"train": [GOOD], "test": [FOUR]}})
    assert main(["genies", "download", "--source", str(tmp_path / "ok"), "--dest", str(tmp_path / "dest")]) == 0
    assert "2 records checked, 0 bad" in capsys.readouterr().out


def test_distribution_names_without_a_release(tmp_path):
    with pytest.raises(GeniesDataError, match="no distributions/ folder"):
        distribution_names(tmp_path)
    _release(tmp_path, {"a": {"train": [GOOD]}})
    with pytest.raises(GeniesDataError, match="unknown distribution 'b'.*available: a"):
        distribution_dir(tmp_path, "b")


# -- shifts --------------------------------------------------------------------
def test_builtin_genies_shifts():
    shifts = load_shifts("builtin:genies")
    assert shifts is GENIES and len(shifts) == 15 and len(set(shifts)) == 15
    assert len({s.category for s in shifts}) == 8
    assert {s.name: s.target_reference for s in shifts if s.target_reference} == {
        "alpaca_short->alpaca_long": "alpaca_mmlu",
        "alpaca_mmlu->sycophancy_mimicry": "quote_attribution",
    }
    assert {s.label for s in shifts} == {"extreme", "probing"}
    by_name = {s.name: s for s in shifts}
    assert by_name["alpaca_short->alpaca_long"].reference == "alpaca_mmlu"
    assert by_name["code_easy->code_hard"].reference == "code_hard"


def test_builtin_matches_the_published_genies_spec():
    spec = require_shared(SHIFT_SPECS / "GENIES.json", "published shift spec")
    assert load_shifts(str(spec)) == GENIES


def test_one_pair_per_prompt_draws_a_dispreferred_response_from_the_seed():
    records = [{"prompt": f"q{i}", "responses": {"right": 1.0, "w1": 0.0, "w2": 0.0, "w3": 0.0}} for i in range(40)]
    pairs = expand_pairs([GOOD, *records], seed=0, distribution="d", split="train")
    kept = one_pair_per_prompt(pairs, seed=0)
    assert [p["prompt"] for p in kept] == [GOOD["prompt"]] + [f"q{i}" for i in range(40)]  # one each, in order
    assert all(p in pairs for p in kept)
    drawn = [preferred_texts(p)[1] for p in kept[1:]]
    assert set(drawn) == {"w1", "w2", "w3"}  # not always the first dispreferred
    assert one_pair_per_prompt(pairs, seed=0) == kept and one_pair_per_prompt(pairs, seed=1) != kept


def test_published_all_json_dedupes_to_56(genies_tar):
    spec = require_shared(SHIFT_SPECS / "all.json", "published shift spec")
    assert len(json.loads(spec.read_text())) == 69
    shifts = load_shifts(str(spec))
    assert len(shifts) == 56
    assert len(load_shifts(str(spec), keep_repeats=True)) == 69  # as its published metrics tables list them
    with tarfile.open(genies_tar) as tar:
        names = sorted({n.split("/")[1] for n in tar.getnames() if n.count("/") >= 2})
    check_distributions(shifts, names)  # every distribution it names is in the release


def test_spec_file_is_loaded_in_order_without_repeats(tmp_path):
    entries = [
        {"source": "a", "target": "b", "category": "c", "ignored": 1},
        {"source": "x", "target": "y", "target_reference": "z"},
        {"source": "a", "target": "b", "category": "c"},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(entries))
    shifts = load_shifts(str(spec))
    assert shifts == (Shift(source="a", target="b", category="c"), Shift(source="x", target="y", target_reference="z"))
    assert distributions_needed(shifts) == {"train": {"a", "b", "x", "z"}, "evaluate": {"a", "b", "x", "y", "z"}}


@pytest.mark.parametrize(
    "content,expected",
    [
        ('[{"source": "a", "target": "b"}, {"source": "c"}]', "shift 1: missing or invalid target"),
        ('[{"target": "b"}]', "shift 0: missing or invalid source"),
        ('["a->b"]', "shift 0: missing or invalid entry"),
        ("[]", "expected a non-empty JSON list"),
        ('{"source": "a"}', "expected a non-empty JSON list"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_spec_files(tmp_path, content, expected):
    spec = tmp_path / "spec.json"
    spec.write_text(content)
    with pytest.raises(GeniesDataError, match=expected) as e:
        load_shifts(str(spec))
    assert str(spec) in str(e.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(GeniesDataError, match="shift spec not found.*builtin:genies"):
        load_shifts(str(tmp_path / "none.json"))


def test_check_distributions_names_the_shift_and_lists_what_exists():
    shifts = (Shift(source="a", target="b"), Shift(source="a", target="c", target_reference="gone"))
    check_distributions(shifts[:1], ["a", "b"])
    with pytest.raises(GeniesDataError) as e:
        check_distributions(shifts, ["a", "b", "c"])
    assert str(e.value) == "shift a->c: target_reference 'gone' is not a distribution; available: a, b, c"
    with pytest.raises(GeniesDataError, match="shift a->b: target 'b' is not a distribution"):
        check_distributions(shifts, ["a", "c"])


def test_counts_from_real_records_are_what_expand_pairs_gives(genies_data_dir):
    # alpaca_mmlu lists the preferred answer anywhere among 4; expanding keeps one pair per wrong answer
    records = read_split(genies_data_dir / "distributions" / "alpaca_mmlu", "test")
    pairs = expand_pairs(records, seed=3, distribution="alpaca_mmlu", split="test")
    assert Counter(p["record"] for p in pairs) == Counter({i: 3 for i in range(len(records))})


def test_an_empty_split_is_bad_input_naming_the_file(tmp_path, tiny_model_dir):
    from alignflow.genies.stages import GENIES_PAIRS, pairs_spec
    from alignflow.tasks.base_model import base_model_ref
    from alignflow.tasks.stage import RunContext

    _release(tmp_path, {"empty": {"train": [GOOD], "test": []}})
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    model = base_model_ref(str(tiny_model_dir), ctx.model_cache)
    with pytest.raises(GeniesDataError) as e:
        GENIES_PAIRS.run(ctx, pairs_spec(tmp_path, "empty", "test", 512, 6, 0), model=model)
    assert str(tmp_path / "distributions" / "empty" / "test.json") in str(e.value)
