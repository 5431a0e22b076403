"""docker-compose.yml and the Dockerfiles: checked statically (no Docker engine runs here)."""

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
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    for source in copied:
        assert (REPO / source).exists(), source


def test_cpu_image_takes_the_cpu_build_of_torch():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "faiss-gpu" not in text


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed")
def test_docker_compose_validates_the_file():
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "RECSERVE_ADMIN_TOKEN": "x" * 20},
    )
    assert result.returncode == 0, result.stderr


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
        and name not in ("service/serve.py", "bench/attacks.py")  # attacks: the old way, compared
        and (REPO / name).is_file()
        and DIRECT_UVICORN.search((REPO / name).read_text(errors="replace"))
    ]
    assert starting == []
