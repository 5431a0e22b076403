import pkgutil
import subprocess
import sys

import service

SERVICE_MODULES = [
    "service.bundle",
    "service.retrieval",
    "service.encoder",
    "service.histories",
    "service.devices",
    "service.errors",
    "service.settings",
    "service.metrics",
    "service.cache",
    "service.features",
    "service.ranking",
    "service.batching",
    "service.recommender",
    "service.state",
    "service.main",
    "service.api.schemas",
    "service.api.deps",
    "service.api.routes.admin",
    "service.api.routes.events",
    "service.api.routes.health",
    "service.api.routes.items",
    "service.api.routes.recommend",
]

LEAK_CHECK = (
    "leaked = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
    "assert not leaked, leaked\n"
)


def all_service_modules() -> list[str]:
    """The listed modules and any other module of the package (new ones are covered too)."""
    found = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
    return sorted(set(SERVICE_MODULES) | set(found))


def test_the_service_never_imports_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in all_service_modules()) + LEAK_CHECK
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_serving_requests_never_imports_torch(exported_bundle):
    # Heavy imports (onnxruntime, faiss) happen lazily while a bundle loads and requests
    # run, so the whole path is exercised, not just the module imports.
    models_dir, _ = exported_bundle
    code = (
        "import socket, sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.main import create_app\n"
        "from service.settings import Settings\n"
        "sock = socket.socket(); sock.bind(('127.0.0.1', 0)); port = sock.getsockname()[1]\n"
        "sock.close()\n"
        f"settings = Settings(models_dir={str(models_dir)!r}, dev_mode=True, device='cpu',\n"
        "    redis_url=f'redis://127.0.0.1:{port}/0', reload_poll_seconds=0)\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    history = [{'item_id': '1', 'ts': 10}, {'item_id': '2', 'ts': 20}]\n"
        "    response = client.post('/recommend', json={'history': history})\n"
        "    assert response.status_code == 200, response.text\n"
        "    assert client.get('/items/1/similar').status_code == 200\n"
        "    assert client.get('/readyz').status_code == 200\n" + LEAK_CHECK
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
