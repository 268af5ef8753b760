"""docker/: static checks, no engine needed. compose.yaml wires the services (ports on 127.0.0.1
by default, volumes, healthchecks, the worker's URLs), the Dockerfiles parse and copy files that
exist, and the CPU image pins torch from the CPU index. ``docker compose config`` runs too
where the compose plugin is installed."""

from __future__ import annotations

import fnmatch
import itertools
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
PREFLOOP_SERVICES = ("prefect-server", "mlflow", "worker", "worker-gpu")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} / ${VAR} / $$ interpolation, enough for this file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    pattern = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}")
    return pattern.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""), value)


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env or {})


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continuation line"
    return out


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in dockerignore())


def project_torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("torch"))


def test_services_images_and_build():
    cfg = compose()
    assert set(cfg["services"]) == {"postgres", *PREFLOOP_SERVICES}
    assert cfg["services"]["postgres"]["image"].startswith("postgres:")
    for name in PREFLOOP_SERVICES:
        service = cfg["services"][name]
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).is_file(), name
    assert cfg["services"]["worker"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    gpu = cfg["services"]["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda" and gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--name prefloop-gpu" in gpu["command"]  # its own deployment, beside the CPU worker's


def test_ports_bind_to_localhost_unless_configured():
    published = {name: s.get("ports", []) for name, s in compose()["services"].items()}
    assert published["postgres"] == []  # reachable from the other containers only
    assert published["prefect-server"] == ["127.0.0.1:4200:4200"]
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert published["worker"] == [] and published["worker-gpu"] == []
    exposed = compose({"PREFLOOP_BIND": "0.0.0.0", "PREFECT_PORT": "14200"})["services"]
    assert exposed["prefect-server"]["ports"] == ["0.0.0.0:14200:4200"]
    assert exposed["prefect-server"]["environment"]["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:14200/api"


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert set(services["prefect-server"]["depends_on"]) == set(services["mlflow"]["depends_on"]) == {"postgres"}
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert "127.0.0.1:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    worker = services["worker"]
    assert worker["environment"]["PREFECT_RUNNER_SERVER_ENABLE"] == "true"  # what its healthcheck polls
    assert f"127.0.0.1:{worker['environment']['PREFECT_RUNNER_SERVER_PORT']}/health" in " ".join(
        worker["healthcheck"]["test"])


def test_worker_reaches_both_servers_and_stores_runs_on_volumes():
    cfg = compose()
    services, volumes = cfg["services"], set(cfg["volumes"])
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--port 4200" in services["prefect-server"]["command"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--port 5000" in services["mlflow"]["command"]
    assert services["worker"]["command"].split()[:3] == ["python", "-m", "flows.serve"]
    assert services["worker"]["environment"] == services["worker-gpu"]["environment"]
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in volumes or (DOCKER / source).exists(), mount
    assert "runs:/app/runs" in services["worker"]["volumes"]


def test_servers_use_postgres_and_mlflow_serves_artifacts_from_a_volume():
    services = compose()["services"]
    postgres = services["postgres"]
    user, password = postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_PASSWORD"]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db == f"postgresql+asyncpg://{user}:{password}@postgres:5432/{postgres['environment']['POSTGRES_DB']}"
    mlflow = shlex.split(services["mlflow"]["command"])
    option = {k: v for k, v in itertools.pairwise(mlflow) if k.startswith("--")}
    assert option["--backend-store-uri"] == f"postgresql://{user}:{password}@postgres:5432/mlflow"
    assert "--serve-artifacts" in mlflow and option["--artifacts-destination"] == "/mlartifacts"
    assert "mlartifacts:/mlartifacts" in services["mlflow"]["volumes"]
    assert "mlflow:5000" in option["--allowed-hosts"].split(",")  # the worker's Host header
    init = next(v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert "CREATE DATABASE mlflow" in (DOCKER / init.split(":")[0]).read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_parse_and_copy_files_that_exist(name):
    steps = instructions(DOCKER / name)
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "EXPOSE",
             "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}
    assert steps[0][0] == "FROM", "FROM must come first"
    assert all(keyword in known for keyword, _ in steps), [k for k, _ in steps if k not in known]
    for keyword, args in steps:
        if keyword == "COPY" and "--from" not in args:
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
                assert not ignored(source), f"{name} copies {source}, which .dockerignore leaves out"
    installs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert project_torch_pin() == "torch==2.13.0" and "torch==2.13.0" in installs
    cmd = next(args for keyword, args in reversed(steps) if keyword == "CMD")
    assert yaml.safe_load(cmd)[:3] == ["python", "-m", "flows.serve"]
    assert any(keyword == "USER" and args != "root" for keyword, args in steps)  # not root at run time


def test_cpu_image_pins_torch_from_the_cpu_index():
    steps = instructions(DOCKER / "Dockerfile.cpu")
    assert steps[0] == ("FROM", "python:3.11-slim")
    torch_step = next(args for keyword, args in steps if keyword == "RUN" and "torch" in args)
    assert "torch==2.13.0" in torch_step and "--index-url https://download.pytorch.org/whl/cpu" in torch_step
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert runs.index(torch_step) < next(i for i, a in enumerate(runs) if "pip install ." in a)  # torch first


def test_cuda_image_has_python_311_and_the_gpu_extra():
    steps = instructions(DOCKER / "Dockerfile.cuda")
    assert steps[0][1].startswith("nvidia/cuda:") and "runtime" in steps[0][1]
    installs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "python3.11 -m venv" in installs and '".[gpu]"' in installs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras


def test_dockerignore_keeps_environments_and_outputs_out():
    for path in (".venv/bin/python", ".git/HEAD", "runs/x/round_1", "mlflow.db", "flows/__pycache__/x.pyc"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "flows/serve.py", "conf/config.yaml"):
        assert not ignored(path), path


def test_docker_compose_config_accepts_the_file():
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True, check=False).returncode == 0:
            break
    else:
        pytest.skip("no docker compose on this machine")
    done = subprocess.run([*command, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
