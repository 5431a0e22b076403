"""/metrics of a server of several workers (prometheus_client's multiprocess mode): the
bundle gauge after a reload. prometheus_client decides the mode when it is imported, so
each "worker" here is a process of its own started with the shared directory set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from prometheus_client.multiprocess import mark_process_dead

from tests.service.test_shared_compute import server_figures

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from service.metrics import Metrics

    metrics = Metrics()
    assert metrics.shared_dir, "not in multiprocess mode"
    for bundle in sys.argv[1:]:
        metrics.serving(bundle)
    print(json.dumps({"pid": os.getpid(), "text": metrics.render().decode()}))
    """
)


def worker(directory, *bundles: str) -> dict:
    """Run a worker that serves ``bundles`` in turn and exits without marking itself dead
    (as if still alive); its pid and the /metrics text it rendered last."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *bundles],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


def bundle_figures(text: str) -> dict[str, float]:
    return {
        dict(labels)["bundle"]: value
        for (name, labels), value in server_figures(text).items()
        if name == "recserve_bundle_info"
    }


def test_a_reloaded_bundle_reads_zero_once_no_live_worker_serves_it(tmp_path):
    other = worker(tmp_path, "old")  # a worker not yet reloaded
    reloaded = worker(tmp_path, "old", "new")
    # The other worker still serves the old bundle: both read 1.
    assert bundle_figures(reloaded["text"]) == {"old": 1, "new": 1}
    # Once it is gone (or reloaded too), only the new bundle is served.
    mark_process_dead(other["pid"], str(tmp_path))
    assert bundle_figures(worker(tmp_path)["text"]) == {"old": 0, "new": 1}
