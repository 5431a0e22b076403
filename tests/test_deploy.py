"""deploy/ (Kubernetes): every manifest against the Kubernetes schemas, and against what the
service really reads, serves and listens on. No cluster runs here (docs/DEPLOYMENT.md).

The kustomizations list only ``resources`` (a test holds them to it), so reading each
listed file is exactly what ``kubectl kustomize`` renders; where kubectl is installed a
test compares the two.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.bundle import current_name
from service.main import create_app
from service.serve import parse_args
from service.settings import Settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")
# 1.30: the oldest release with the HPA's ContainerResource metric stable; and the newest
# whose schemas kubernetes-validate carries.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
TEMPLATES = sorted(DEPLOY.rglob("*.example.yaml"))
MANIFESTS = sorted(path for path in DEPLOY.rglob("*.yaml") if path.name != "kustomization.yaml")
# From start to /healthz took 5.4-5.8 s here on a 1,682-item bundle; larger catalogues
# load and warm up longer and were not timed (docs/DEPLOYMENT.md), hence minutes.
STARTUP_ALLOWANCE_SECONDS = 300


def documents_of(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def documents(path: Path) -> list[dict]:
    return documents_of(path.read_text())


def render(folder: Path) -> list[dict]:
    """What ``kubectl kustomize folder`` gives for a kustomization of resources only."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, folder
    rendered = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        rendered += render(path) if path.is_dir() else documents(path)
    return rendered


def named(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(DEPLOY / "base")


@pytest.fixture(scope="module")
def deployment(base) -> dict:
    return named(base, "Deployment", "recserve")


@pytest.fixture(scope="module")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def serve(pod) -> dict:
    return next(c for c in pod["containers"] if c["name"] == "serve")


@pytest.fixture(scope="module")
def config(base) -> dict[str, str]:
    return named(base, "ConfigMap", "recserve-config")["data"]


@pytest.fixture(scope="module")
def settings(config) -> Settings:
    """The settings a pod starts with: the ConfigMap plus the Secrets' variables."""
    return Settings(
        **{key.removeprefix("RECSERVE_").lower(): value for key, value in config.items()},
        admin_token="t" * 32,
        redis_url="redis://recserve-redis:6379/0",
    )


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path, version):
    for doc in documents(path):
        # strict: a misspelt field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_manifest_is_in_a_kustomization_or_a_template():
    listed = set()
    for folder in ("base", *OVERLAYS):
        kustomization = yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())
        listed |= {(DEPLOY / folder / r).resolve() for r in kustomization["resources"]}
    untemplated = {path.resolve() for path in MANIFESTS} - {p.resolve() for p in TEMPLATES}
    assert untemplated <= listed, untemplated - listed
    # Applying a kustomization must never overwrite a real secret with a placeholder.
    assert not listed & {path.resolve() for path in TEMPLATES}


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
@pytest.mark.parametrize("folder", ["base", *OVERLAYS])
def test_kubectl_kustomize_renders_what_these_tests_read(folder):
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def key(doc):
        return (doc["kind"], doc["metadata"]["name"])

    assert sorted(documents_of(out), key=key) == sorted(render(DEPLOY / folder), key=key)


def test_dev_runs_redis_in_the_cluster_and_prod_expects_an_external_one():
    dev, prod = render(DEPLOY / "dev"), render(DEPLOY / "prod")
    redis = named(dev, "StatefulSet", "recserve-redis")
    service = named(dev, "Service", "recserve-redis")
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    port = redis["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    url = named(dev, "Secret", "recserve-redis")["stringData"]["url"]
    assert url == f"redis://{service['metadata']['name']}:{port}/0"

    assert not [doc for doc in prod if doc["kind"] == "StatefulSet"]
    assert not [doc for doc in prod if doc["metadata"]["name"] == "recserve-redis"]
    template = named(documents(DEPLOY / "prod" / "redis-secret.example.yaml"), "Secret")
    assert template["metadata"]["name"] == "recserve-redis"
    assert "REPLACE-ME" in template["stringData"]["url"]


def test_every_secret_the_pods_read_has_a_template_or_an_overlay(pod):
    provided = {
        (doc["metadata"]["name"], key)
        for path in MANIFESTS
        for doc in documents(path)
        if doc["kind"] == "Secret"
        for key in doc["stringData"]
    }
    containers = pod["containers"] + pod["initContainers"]
    for container in containers:
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert (ref["name"], ref["key"]) in provided, ref
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert any(name == source["secretRef"]["name"] for name, _ in provided)


def test_the_admin_token_placeholder_is_refused_by_the_service():
    secret = named(documents(DEPLOY / "admin-secret.example.yaml"), "Secret", "recserve-admin")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(admin_token=secret["stringData"]["admin-token"], dev_mode=False)


def test_every_recserve_variable_is_a_setting_the_service_reads(config, serve):
    fields = {f"RECSERVE_{name.upper()}" for name in Settings.model_fields}
    named_here = set(config) | {var["name"] for var in serve["env"]}
    recserve = {name for name in named_here if name.startswith("RECSERVE_")}
    assert recserve == named_here
    assert recserve <= fields, recserve - fields


def test_the_configuration_is_one_the_service_accepts(settings):
    assert settings.host == "0.0.0.0"
    assert settings.reload_poll_seconds > 0  # how a synced bundle gets served


def test_the_container_runs_service_serve_like_the_image(serve):
    assert serve["command"] == ["python", "-m", "service.serve"]
    assert "args" not in serve  # host, port and workers from the ConfigMap
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        cmd = re.search(r"^CMD (\[.*\])$", (REPO / "docker" / dockerfile).read_text(), re.M)
        assert yaml.safe_load(cmd.group(1))[:3] == serve["command"]


def test_the_container_port_is_the_port_the_service_listens_on(serve, settings, base, pod):
    ports = {port["name"]: port["containerPort"] for port in serve["ports"]}
    listening = parse_args([], settings)
    assert ports == {"http": listening.port}
    assert listening.host == "0.0.0.0"
    service = named(base, "Service", "recserve")
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    annotations = named(base, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == listening.port


def test_probes_ask_routes_the_app_serves(serve, settings, base):
    # The app's own description of what it serves (its routes, as FastAPI dispatches them).
    paths = create_app(settings).openapi()["paths"]
    routes = {path for path, methods in paths.items() if "get" in methods}
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert serve[probe]["httpGet"]["path"] in routes
        assert serve[probe]["httpGet"]["port"] == "http"
    annotations = named(base, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes


def test_the_startup_probe_allows_the_warm_up(serve):
    startup = serve["startupProbe"]
    allowed = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed >= STARTUP_ALLOWANCE_SECONDS


def test_the_service_reads_the_volume_the_sync_containers_fill(pod, serve, settings):
    mounts = {m["name"]: m for m in serve["volumeMounts"]}
    assert mounts["models"]["mountPath"] == str(settings.models_dir)
    assert mounts["models"]["readOnly"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp"
    init = next(c for c in pod["initContainers"] if c["name"] == "bundle-init")
    sidecar = next(c for c in pod["containers"] if c["name"] == "bundle-sync")
    for sync in (init, sidecar):
        env = {var["name"]: var["value"] for var in sync["env"]}
        writes = {m["name"]: m["mountPath"] for m in sync["volumeMounts"]}
        assert env["MODELS_DIR"] == writes["models"] == str(settings.models_dir)
    # The sidecar is the init container run in a loop: same source, same store.
    init_env = {var["name"]: var["value"] for var in init["env"]}
    sidecar_env = {var["name"]: var["value"] for var in sidecar["env"]}
    assert int(sidecar_env.pop("SYNC_INTERVAL_SECONDS")) > 0
    assert sidecar_env == init_env
    assert sidecar["envFrom"] == init["envFrom"]


def test_every_container_runs_unprivileged_on_a_read_only_root(pod):
    uid = re.search(r"--uid (\d+)", (REPO / "docker" / "Dockerfile").read_text()).group(1)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    for container in pod["containers"] + pod["initContainers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]


def test_hpa_pdb_and_service_select_the_deployments_pods(base, deployment, serve):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        spec = named(base, kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = named(base, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["metrics"][0]["containerResource"]["container"] == serve["name"]
    assert "cpu" in serve["resources"]["requests"]  # utilization is of the request
    # A drain may take one pod only while another serves.
    assert hpa["minReplicas"] >= 2
    assert named(base, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# -- the bundle-sync script, run with a mounted folder as its source


@pytest.fixture(scope="module")
def sync_script(tmp_path_factory, base) -> Path:
    path = tmp_path_factory.mktemp("script") / "sync.sh"
    path.write_text(named(base, "ConfigMap", "recserve-bundle-sync")["data"]["sync.sh"])
    return path


def publish(source: Path, name: str) -> None:
    """A bundle as the export writes it: its folder, then CURRENT."""
    (source / name / "retrievers").mkdir(parents=True)
    (source / name / "manifest.json").write_text(f'{{"name": "{name}"}}')
    (source / name / "retrievers" / "vectors.npy").write_bytes(name.encode() * 100)
    (source / "CURRENT").write_text(f"{name}\n")


def sync(script: Path, source: Path, models: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(script)],
        env={"PATH": "/usr/bin:/bin", "BUNDLE_SOURCE": str(source), "MODELS_DIR": str(models)}
        | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(not shutil.which("sh"), reason="no POSIX shell")
def test_sync_copies_the_published_bundle_then_points_current_at_it(sync_script, tmp_path):
    source, models = tmp_path / "bucket", tmp_path / "models"
    source.mkdir(), models.mkdir()
    publish(source, "b1")
    assert sync(sync_script, source, models).returncode == 0
    assert current_name(models) == "b1"
    copied = models / "b1" / "retrievers" / "vectors.npy"
    assert copied.read_bytes() == (source / "b1" / "retrievers" / "vectors.npy").read_bytes()

    publish(source, "b2")
    result = sync(sync_script, source, models)
    assert result.returncode == 0, result.stderr
    assert current_name(models) == "b2"
    assert "CURRENT: b1 -> b2" in result.stderr
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "b1", "b2"]  # nothing left over


@pytest.mark.skipif(not shutil.which("sh"), reason="no POSIX shell")
def test_sync_refuses_a_name_the_service_would_refuse(sync_script, tmp_path):
    source, models = tmp_path / "bucket", tmp_path / "models"
    source.mkdir(), models.mkdir()
    publish(source, "b1")
    assert sync(sync_script, source, models).returncode == 0
    (source / "CURRENT").write_text("../elsewhere\n")
    result = sync(sync_script, source, models)
    assert result.returncode == 1
    assert current_name(models) == "b1"


@pytest.mark.skipif(not shutil.which("sh"), reason="no POSIX shell")
def test_sync_keeps_the_newest_bundles_and_always_the_served_one(sync_script, tmp_path):
    source, models = tmp_path / "bucket", tmp_path / "models"
    source.mkdir(), models.mkdir()
    for name in ("b1", "b2", "b3"):
        publish(source, name)
        assert sync(sync_script, source, models, KEEP_BUNDLES="2").returncode == 0
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "b2", "b3"]
    (source / "CURRENT").write_text("b2\n")  # a rollback to a bundle still on disk
    assert sync(sync_script, source, models, KEEP_BUNDLES="1").returncode == 0
    assert current_name(models) == "b2"
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "b2"]


@pytest.mark.skipif(not shutil.which("sh"), reason="no POSIX shell")
def test_sync_copies_and_keeps_the_bundles_an_experiments_arms_name(sync_script, tmp_path):
    source, models = tmp_path / "bucket", tmp_path / "models"
    source.mkdir(), models.mkdir()
    for name in ("arm-b", "b1"):
        publish(source, name)
    experiment = tmp_path / "experiment.json"
    arms = [{"name": "control", "weight": 1}, {"name": "new", "weight": 1, "bundle": "arm-b"}]
    experiment.write_text(json.dumps({"name": "e", "arms": arms}, indent=1))
    assert sync(sync_script, source, models).returncode == 0  # without the file: CURRENT's
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "b1"]

    with_arms = {"EXPERIMENT_FILE": str(experiment), "KEEP_BUNDLES": "1"}
    result = sync(sync_script, source, models, **with_arms)
    assert result.returncode == 0 and "copied arm-b" in result.stderr
    for name in ("b2", "b3"):  # newer bundles replace the served one; the arm's stays
        publish(source, name)
        assert sync(sync_script, source, models, **with_arms).returncode == 0
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "arm-b", "b3"]
    copied = models / "arm-b" / "retrievers" / "vectors.npy"
    assert copied.read_bytes() == (source / "arm-b" / "retrievers" / "vectors.npy").read_bytes()

    # Names the service would refuse are said and skipped, never split or expanded.
    (source / "b3-copy").mkdir()
    odd = [{"name": f"odd{i}", "weight": 1, "bundle": b} for i, b in enumerate(["*", "b1 b3-copy"])]
    experiment.write_text(json.dumps({"name": "e", "arms": arms + odd}))
    result = sync(sync_script, source, models, **with_arms)
    assert result.returncode == 0 and result.stderr.count("an arm names no bundle") == 2
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "arm-b", "b3"]

    # An arm naming a bundle the store lacks: CURRENT stays where it was, and it says why.
    arms.append({"name": "gone", "weight": 1, "bundle": "absent"})
    experiment.write_text(json.dumps({"name": "e", "arms": arms}))
    publish(source, "b4")
    result = sync(sync_script, source, models, **with_arms)
    assert result.returncode == 1 and "copying absent failed" in result.stderr
    assert current_name(models) == "b3"


@pytest.mark.skipif(not shutil.which("sh"), reason="no POSIX shell")
def test_the_sidecar_outlives_an_unreachable_store(sync_script, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    process = subprocess.Popen(
        ["sh", str(sync_script)],
        env={
            "PATH": "/usr/bin:/bin",
            "BUNDLE_SOURCE": str(tmp_path / "absent"),
            "MODELS_DIR": str(models),
            "SYNC_INTERVAL_SECONDS": "1",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=2.5)  # two failed rounds, still looping
    finally:
        process.kill()
    assert process.stderr.read().count("cannot read") >= 2
