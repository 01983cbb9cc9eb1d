"""Process set-up before Prefect is imported: its home, results and logs live under
the run's paths, and offline telemetry is off. A user's own PREFECT_API_URL
(a real server) is respected; without it Prefect runs ephemeral."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from alignflow.config import Paths

# Every alignflow flow run heartbeats this often; the zombie-detection automation
# (deployments/deploy.py) marks a run Crashed after several missed beats.
HEARTBEAT_SECONDS = 60


def configure_environment(paths: Paths) -> Path:
    """Set Prefect's environment and start a log file; returns the log file path."""
    prefect_home = Path(paths.prefect_home)
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(prefect_home / "results"))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run creates and migrates Prefect's database: on 2 busy cores that
    # took 35-40 s, past Prefect's 20 s default, and the run failed to start.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    flow_run_environment()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would drown the stage bars
    logs = Path(paths.logs)
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("alignflow")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return log_file


def flow_run_environment() -> None:
    """Prefect settings for any process that runs alignflow's flow runs: the CLI, and a
    worker, whose flow-run processes inherit its environment. They heartbeat, and the
    ``alignflow`` logger's INFO records (shard progress, commits, training steps) go to
    the run's Prefect logs (the UI's Logs tab) while the console shows only warnings:
    the root level lets INFO through, the console handler stops it, and Prefect's own
    loggers stay at PREFECT_LOGGING_LEVEL."""
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    extra = [name for name in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if name.strip()]
    os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(dict.fromkeys([*extra, "alignflow"]))
    os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # records logged outside a flow run (before it starts, after it ends) stay in the local file
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
