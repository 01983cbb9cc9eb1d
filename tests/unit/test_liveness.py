"""The process recorded for a flow run: alive, gone, or not for this host to tell."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import psutil

from alignflow.liveness import parse_process, process_gone, this_process

HOST = socket.gethostname()


def test_this_process_is_recorded_with_its_start_time_and_is_alive():
    label = this_process()
    recorded = parse_process(label)
    assert (recorded.host, recorded.pid) == (HOST, os.getpid())
    assert abs(recorded.start - psutil.Process().create_time()) < 0.01
    assert process_gone(label) is False


def test_a_process_that_ended_is_gone_in_both_recorded_forms():
    child = subprocess.Popen(["sleep", "30"])
    label = f"{HOST}:{child.pid}:{psutil.Process(child.pid).create_time():.2f}"
    assert process_gone(label) is False and process_gone(f"{HOST}:{child.pid}") is False
    child.kill()
    _wait_until_zombie(child.pid)
    assert process_gone(label) is True  # killed and not yet reaped: a zombie counts as gone
    child.wait()
    assert process_gone(label) is True and process_gone(f"{HOST}:{child.pid}") is True


def _wait_until_zombie(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL is delivered asynchronously: the child is a zombie only a moment later."""
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"process {pid} still not a zombie after SIGKILL"
        time.sleep(0.01)


def test_a_reused_pid_is_a_different_process():
    me = psutil.Process()
    assert process_gone(f"{HOST}:{me.pid}:{me.create_time() - 60:.2f}") is True


def test_no_record_another_host_or_a_bare_pid_cannot_be_told():
    assert process_gone(None) is None
    assert process_gone(f"not-{HOST}:{os.getpid()}:1.00") is None
    assert process_gone(str(os.getpid())) is None  # Prefect's process worker names no host
    assert parse_process("a:b:c") is None
