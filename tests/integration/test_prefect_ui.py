"""The real Prefect UI in headless Chromium: the page of a finished self-improve run
lists its summary artifact, the summary links every stage's artifact, the judge's
examples show both verdicts and train_dpo's curves are a picture. The screenshots
are kept in tests/output/."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_config_data

pytest_plugins = ["prefect_server"]

OUTPUT = Path(__file__).resolve().parents[1] / "output"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--virtual-time-budget=20000",
]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """Run headless Chromium on a URL with extra flags; returns its stdout (the DOM for --dump-dom)."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(url: str, *flags: str) -> str:
        done = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


@pytest.fixture(scope="module")
def finished_run(prefect_server, tiny_model_dir, tmp_path_factory):
    """A self-improve run on the tiny model, reported to the server; (flow run id, summary)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from alignflow.config import SelfImproveConfig
    from alignflow.flows.self_improve import self_improve

    home = tmp_path_factory.mktemp("ui-run")
    config = SelfImproveConfig.model_validate(tiny_config_data(tiny_model_dir, home))
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        state = self_improve(config=config, return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


def visible_text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_flow_run_page_shows_the_summary_artifact(prefect_server, finished_run, chromium, tmp_path):
    run_id, _ = finished_run
    # the v2 UI opens a run on a given tab from its URL; v1 always opens on Logs
    page = f"{prefect_server.url}/v2/runs/flow-run/{run_id}?tab=Artifacts"
    text = visible_text(chromium(page, "--dump-dom"))
    assert "self-improve-summary" in text and "self-improve: artifacts and headline metrics" in text, text[-3000:]
    assert "train-dpo-report" in text
    assert {"sample-examples", "judge-examples", "pairs-examples", "train-dpo-examples"} <= set(text.split()), text[
        -3000:
    ]
    screenshot = tmp_path / "flow-run-artifacts.png"
    chromium(page, f"--screenshot={screenshot}", "--window-size=1400,1000")
    assert screenshot.stat().st_size > 10_000
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(screenshot, OUTPUT / screenshot.name)


def artifact_page(prefect_server, run_id, key: str) -> str:
    """The UI page of the run's artifact ``key``."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with prefect_server.client() as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        )
    return f"{prefect_server.url}/artifacts/artifact/{artifact.id}"


def keep_screenshot(chromium, page: str, tmp_path: Path, name: str) -> None:
    screenshot = tmp_path / name
    chromium(page, f"--screenshot={screenshot}", "--window-size=1400,1600")
    assert screenshot.stat().st_size > 10_000
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(screenshot, OUTPUT / name)


def test_summary_artifact_page_links_every_stage_artifact(prefect_server, finished_run, chromium):
    run_id, summary = finished_run
    dom = chromium(artifact_page(prefect_server, run_id, "self-improve-summary"), "--dump-dom")
    links = set(re.findall(r'href="(file://[^"]+)"', dom))
    assert {Path(info["uri"]).as_uri() for info in summary["rounds"][0].values()} <= links, sorted(links)


def test_judge_examples_show_both_outputs_and_both_verdicts(prefect_server, finished_run, chromium, tmp_path):
    run_id, _ = finished_run
    page = artifact_page(prefect_server, run_id, "judge-examples")
    text = visible_text(chromium(page, "--dump-dom"))
    assert "judge: comparisons, both orders" in text, text[-3000:]
    assert text.count("example ") >= 3 and text.count("instruction") >= 3
    assert len(re.findall(r"p\(\d+ better\), shown first \d\.\d{3}", text)) == 3, text[-3000:]
    assert len(re.findall(r"p\(\d+ better\), shown second \d\.\d{3}", text)) == 3
    keep_screenshot(chromium, page, tmp_path, "judge-examples.png")


def test_train_dpo_curves_are_a_picture_of_every_step(prefect_server, finished_run, chromium, tmp_path):
    run_id, summary = finished_run
    page = artifact_page(prefect_server, run_id, "train-dpo-examples")
    dom = chromium(page, "--dump-dom")
    steps = summary["rounds"][0]["train_dpo"]["steps"]
    assert f"{steps} optimizer steps" in visible_text(dom)
    [image] = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', dom)
    assert base64.b64decode(image).startswith(b"\x89PNG")
    keep_screenshot(chromium, page, tmp_path, "train-dpo-curves.png")
