"""docker-compose.yml and the Dockerfiles: checked statically, and built and run for real by
scripts/compose-check.sh (podman; opt-in: RECSERVE_COMPOSE_CHECK=1, minutes)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_redis_has_a_healthcheck_and_the_service_waits_for_it(compose):
    services = compose["services"]
    assert "redis-cli" in " ".join(services["redis"]["healthcheck"]["test"])
    depends = services["service"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["export"]["condition"] == "service_completed_successfully"


def test_export_job_writes_the_bundle_into_the_volume_the_service_reads(compose):
    services = compose["services"]
    assert "models:/models" in services["export"]["volumes"]
    assert "models:/models:ro" in services["service"]["volumes"]
    assert services["service"]["environment"]["RECSERVE_MODELS_DIR"] == "/models"
    assert services["export"]["restart"] == "no"
    assert "models" in compose["volumes"]


def test_every_build_target_exists_in_its_dockerfile(compose):
    for service in compose["services"].values():
        build = service.get("build")
        if not build:
            continue
        dockerfile = (REPO / build["dockerfile"]).read_text()
        assert re.search(rf"^FROM .* AS {build['target']}$", dockerfile, re.M)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_run_as_an_unprivileged_user_and_serve_with_service_serve(name):
    text = (REPO / "docker" / name).read_text()
    assert "USER recserve" in text
    assert 'CMD ["python", "-m", "service.serve"' in text
    # sources from the build context (not --from another stage) exist and pass .dockerignore
    copied = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    mounted = re.findall(r"--mount=type=bind,source=([^,\s]+)", text)
    allowed = [
        line[1:].strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert copied
    for source in copied + mounted:
        assert (REPO / source).exists(), source
        assert source.split("/")[0] in allowed, f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_base_image_is_an_argument_whose_default_is_the_public_image(name):
    """docker/local/ builds on stand-ins where no registry answers; the files stay the same."""
    text = (REPO / "docker" / name).read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms[0] == "${PYTHON_IMAGE}"
    stages = set(re.findall(r"^FROM .* AS (\S+)$", text, re.M))
    assert set(froms[1:]) <= stages  # every other stage starts from one of the file's own


def instructions(path: Path) -> str:
    """The file without its comment lines."""
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def test_serve_image_copies_the_venv_alone_and_has_what_its_healthchecks_run(compose):
    text = (REPO / "docker" / "Dockerfile").read_text()
    serve = text.split("AS serve\n")[1].split("\nFROM ")[0]
    # the serve stage installs nothing itself: the built virtual environment, no pip cache
    assert "COPY --from=serve-build /opt/venv /opt/venv" in serve and "pip install" not in serve
    assert "torch" not in text.split("AS serve-build")[1].split("AS train")[0]
    for service in ("service", "service-gpu"):
        kind, command = compose["services"][service]["healthcheck"]["test"]
        assert kind == "CMD-SHELL" and command.startswith("python -c ")
        assert "/readyz" in command


def test_cpu_image_takes_the_cpu_build_of_torch():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "faiss-gpu" not in text
    # the local wheels are mounted for the torch step, never copied into a layer
    assert "--mount=type=bind,source=docker/wheels" in text
    assert "*.whl" in (REPO / "docker" / "wheels" / ".gitignore").read_text()


def test_service_runs_read_only_with_a_tmpfs(compose):
    for name in ("service", "service-gpu"):
        service = compose["services"][name]
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]


def test_gpu_services_reserve_a_gpu_and_only_start_with_the_gpu_profile(compose):
    def reserves_gpu(service):
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        return any(d.get("driver") == "nvidia" for d in devices.get("devices", []))

    services = compose["services"]
    gpu = {name for name, service in services.items() if reserves_gpu(service)}
    assert gpu == {"export-gpu", "service-gpu"}
    for name, service in services.items():
        # no profile: started by a plain `up`, which must not need a GPU
        assert (name in gpu) == ("gpu" in service.get("profiles", [])), name
    for name in gpu:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    depends = services["service-gpu"]["depends_on"]
    assert depends["export-gpu"]["condition"] == "service_completed_successfully"


def test_local_stand_in_files_live_apart_and_say_what_they_are_for():
    local = sorted((REPO / "docker" / "local").iterdir())
    assert local
    for path in local:
        assert "LOCAL STAND-INS ONLY" in path.read_text(), path
    for name in ("docker-compose.yml", "docker/Dockerfile", "docker/Dockerfile.gpu"):
        assert "docker/local" not in instructions(REPO / name), name


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed")
@pytest.mark.parametrize("args", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_validates_the_file(args):
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), *args, "config"],
        capture_output=True,
        text=True,
        env={**os.environ, "RECSERVE_ADMIN_TOKEN": "x" * 20},
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["services"]["redis"]["image"] == "redis:7-alpine"
    assert config["services"]["service"]["ports"][0]["published"] == 8000
    devices = config["services"]["service-gpu"]["deploy"]["resources"]["reservations"]
    assert devices["devices"][0]["driver"] == "nvidia"


@pytest.mark.skipif(
    os.environ.get("RECSERVE_COMPOSE_CHECK") != "1",
    reason="builds both images and runs the compose stack (minutes): set RECSERVE_COMPOSE_CHECK=1",
)
def test_compose_stack_builds_serves_and_keeps_histories():
    """scripts/compose-check.sh: build, up, ready, events, recommend, reload, restart, down."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "compose-check.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compose-check: OK" in result.stdout


# Every way the service is started goes through service/serve.py, which gives uvicorn the
# HTTP limits of the settings; a start path of its own would serve without them.
START_PATHS = ["scripts/start.sh", "docker/Dockerfile", "docker/Dockerfile.gpu", "tests/servers.py"]
DIRECT_UVICORN = re.compile(r"-m\s+uvicorn|uvicorn\s+--factory|uvicorn\.run\(|\"uvicorn\",")


@pytest.mark.parametrize("path", START_PATHS)
def test_every_start_path_runs_service_serve(path):
    text = (REPO / path).read_text()
    assert "service.serve" in text
    assert not DIRECT_UVICORN.search(text), DIRECT_UVICORN.search(text)


def test_compose_runs_the_images_own_command(compose):
    service = compose["services"]["service"]
    assert "command" not in service and "entrypoint" not in service


def test_nothing_but_service_serve_starts_uvicorn():
    """Scripts, images, manifests and code: no other file starts uvicorn itself."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    kinds = (".sh", ".py", ".yml", ".yaml", ".toml", ".json", ".cfg", ".ini")
    starting = [
        name
        for name in files
        if (name.endswith(kinds) or "Dockerfile" in name or "Procfile" in name)
        and not name.startswith("docs/")
        # attacks: the old way, compared; plain_peer: not recserve, the server a user would
        # write instead, measured beside it
        and name not in ("service/serve.py", "bench/attacks.py", "bench/plain_peer.py")
        and (REPO / name).is_file()
        and DIRECT_UVICORN.search((REPO / name).read_text(errors="replace"))
    ]
    assert starting == []
