"""A real Prefect server for integration tests: `prefect server start` on 127.0.0.1
and a free port, with its own PREFECT_HOME, shared by the session and stopped at
its end. Test modules load it with ``pytest_plugins = ["prefect_server"]`` (a
fixture imported into two modules would start two servers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for

PREFECT = [sys.executable, "-m", "prefect"]
ALIGNFLOW = [sys.executable, "-m", "alignflow.cli"]


@dataclass(frozen=True)
class PrefectServer:
    url: str  # the UI; the API is under /api
    home: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict:
        """This process's environment pointed at the server (for the CLI, workers, flow runs)."""
        return {**os.environ, "PREFECT_API_URL": self.api_url, **extra}

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}", home=home)
    # the UI asks the API at PREFECT_UI_API_URL, which does not follow --port
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_UI_API_URL": server.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _healthy(server.url) or proc.poll() is not None, 120, "prefect server start")
        assert proc.poll() is None, f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}"
        yield server
    finally:
        stop(proc)
        log.close()
