"""`alignflow genies download` over HTTP, as users fetch the public release:
a real HTTP server on localhost serves a release tar built from real data."""

from __future__ import annotations

import functools
import http.server
import tarfile
import threading
from pathlib import Path

import pytest

from alignflow.cli import main


@pytest.fixture
def release_server(genies_data_dir, tmp_path):
    """http://127.0.0.1:PORT/release.tar.gz holding two real distributions."""
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "release.tar.gz", "w:gz") as tar:
        for name in ("alpaca_short", "alpaca_long"):
            tar.add(genies_data_dir / "distributions" / name, arcname=f"distributions/{name}")
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_over_http_extracts_and_validates(release_server, tmp_path, capsys):
    dest = tmp_path / "genies"
    assert main(["genies", "download", "--source", f"{release_server}/release.tar.gz", "--dest", str(dest)]) == 0
    assert sorted(p.name for p in (dest / "distributions").iterdir()) == ["alpaca_long", "alpaca_short"]
    out = capsys.readouterr().out
    assert "1700 records checked, 0 bad" in out  # 600 + 250 per distribution
    assert not [p for p in dest.iterdir() if p.name.startswith(".genies-")]  # staging folder removed


def test_download_missing_url_is_one_clear_error(release_server, tmp_path, capsys):
    dest = tmp_path / "genies"
    assert main(["genies", "download", "--source", f"{release_server}/nope.tar.gz", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "nope.tar.gz: not found" in err
    assert not (Path(dest) / "distributions").exists()
