"""The real Prefect UI in headless Chromium: the page of a finished self-improve run
lists its summary artifact, and the summary links every stage's artifact. The
screenshot is kept in tests/output/."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_config_data

pytest_plugins = ["prefect_server"]

OUTPUT = Path(__file__).resolve().parents[1] / "output"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--virtual-time-budget=20000"]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """Run headless Chromium on a URL with extra flags; returns its stdout (the DOM for --dump-dom)."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(url: str, *flags: str) -> str:
        done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=120)
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
    screenshot = tmp_path / "flow-run-artifacts.png"
    chromium(page, f"--screenshot={screenshot}", "--window-size=1400,1000")
    assert screenshot.stat().st_size > 10_000
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(screenshot, OUTPUT / screenshot.name)


def test_summary_artifact_page_links_every_stage_artifact(prefect_server, finished_run, chromium):
    run_id, summary = finished_run
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with prefect_server.client() as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["self-improve-summary"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    dom = chromium(f"{prefect_server.url}/artifacts/artifact/{artifact.id}", "--dump-dom")
    links = set(re.findall(r'href="(file://[^"]+)"', dom))
    assert {Path(info["uri"]).as_uri() for info in summary["rounds"][0].values()} <= links, sorted(links)
