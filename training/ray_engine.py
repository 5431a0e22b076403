"""batch-recommend on Ray Data: the same recommendations, computed by a pool of actors.

    python -m training histories --data ml-1m:PATH --out histories/
    python -m training batch-recommend --engine ray --histories histories/ --out recs/ \
        [--ray-address HOST:PORT] [--ray-actors N] [--ray-cpus-per-actor C]

The histories dataset (``training.batch_recommend.histories_table``: ``user``, ``items``,
``timestamps``, one row per user) is read as Parquet partitions; each actor of the pool
loads the bundle once (ONNX encoder and faiss index) and runs every batch it is given
through ``training.batch_recommend.recommendation_rows``, the in-process engine's own
batch; the ``user, rank, item, score`` rows are written as Parquet partitions into
``--out``. Without ``--ray-address`` (or ``RAY_ADDRESS``) a local Ray is started.

Every worker must be able to import this package (``pip install recserve[ray,serve,cpu]``)
and read the models folder at the path the driver names (docs/DEPLOYMENT.md, "Batch
recommendations on Ray").
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

from service.bundle import bundle_dir, current_name, load_bundle, read_manifest
from service.live_catalogue import ServedCatalogue
from training.batch_recommend import (
    check_histories_schema,
    empty_folder,
    history_batch,
    recommendation_rows,
)
from training.errors import ConfigError, TrainingError

LOG = logging.getLogger(__name__)


def result_schema():
    """The output's schema, also that of a batch whose users get no item."""
    import pyarrow as pa

    return pa.schema(
        [
            ("user", pa.string()),
            ("rank", pa.int64()),
            ("item", pa.string()),
            ("score", pa.float32()),
        ]
    )


class BundleRecommender:
    """A Ray Data actor: loads the bundle once, then recommends for batches of histories.

    ``catalogue``: ``(version, records)`` of the catalogue API's writes, applied to the
    bundle's items as ``batch-recommend --catalogue`` does in process (None: the bundle's).
    """

    def __init__(
        self,
        models_dir: str,
        bundle: str,
        encoder: str,
        *,
        k: int,
        device: str,
        threads: int,
        histories: str,
        catalogue: tuple | None = None,
        exposure: float = 1.0,
    ):
        from service.devices import limit_native_threads

        # One actor per reserved CPU: its native kernels must not spread over the node.
        limit_native_threads(threads)
        self.bundle = load_bundle(models_dir, bundle, device=device, threads=threads)
        if catalogue is None:
            self.served = ServedCatalogue.of_bundle(self.bundle)
        else:
            version, records = catalogue
            self.served = ServedCatalogue.of_records(
                self.bundle, version, records, embed=True, exposure=exposure
            )
        self.encoder = encoder
        self.k = k
        self.histories = histories

    def __call__(self, batch):
        import pyarrow as pa

        users, items, timestamps, starts, ends = history_batch(
            batch, self.bundle.catalogue, self.histories
        )
        rows = recommendation_rows(
            self.bundle,
            self.encoder,
            users,
            items,
            timestamps,
            starts=starts,
            ends=ends,
            k=self.k,
            served=self.served,
        )
        return pa.table(rows, schema=result_schema())


# The last line a worker's traceback gives a project error: "package.errors.Name: message".
PROJECT_ERROR = re.compile(r"^(?:training|service)\.errors\.\w+: (.+)$", re.MULTILINE)


def project_error(exc: BaseException) -> str | None:
    """The message of the project's error behind an error of Ray's, or None.

    Ray Data wraps an exception raised in an actor in its own, and what reaches the driver
    keeps the original only as the text of the worker's traceback (the chain of causes is
    not pickled), so the message is read from there.
    """
    found = PROJECT_ERROR.findall(str(exc))
    return found[-1].strip() if found else None


def pool_size(cpus: float, actors: int | None, cpus_per_actor: float) -> int:
    """Actors of the pool: ``actors``, or as many as fit beside one free CPU.

    Ray Data starts the actors before any read task, and a read (or the listing of the
    input's files) waits for a free CPU: a pool that reserves every CPU of the cluster
    waits forever for its input (ray-project/ray#44687, seen here with 2 actors on 2 CPUs).
    """
    if cpus_per_actor <= 0:
        raise ConfigError(f"--ray-cpus-per-actor must be positive, got {cpus_per_actor}")
    room = cpus - 1
    if actors is None:
        actors = max(1, math.floor(room / cpus_per_actor + 1e-9))
    if actors < 1:
        raise ConfigError(f"--ray-actors must be at least 1, got {actors}")
    if actors * cpus_per_actor > room + 1e-9:
        raise ConfigError(
            f"{actors} actors of {cpus_per_actor} CPU leave no CPU of the cluster's {cpus:g} "
            "for reading and writing, and Ray Data would wait forever; use fewer actors or "
            "--ray-cpus-per-actor below 1 (the actors are single-threaded either way)"
        )
    return actors


def ray_batch_recommend(
    models_dir: str | Path,
    histories: str | Path,
    out: str | Path,
    *,
    bundle: str | None = None,
    encoder: str | None = None,
    k: int = 10,
    batch_size: int = 512,
    device: str = "cpu",
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    address: str | None = None,
    catalogue: tuple | None = None,
    exposure: float = 1.0,
) -> dict:
    """Write top-k recommendations of every history in the Parquet folder ``histories`` as
    Parquet partitions into the new or empty folder ``out``; returns counts and throughput.

    Connects to the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, else a new local
    Ray) unless Ray is already initialised. Paths are resolved here: workers read them as
    they are, so they must name the same files on every node.
    """
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the ray engine needs Ray Data ({exc}): pip install 'recserve[ray]'"
        ) from None

    models_dir = Path(models_dir).resolve()
    histories = Path(histories).resolve()
    name = bundle or current_name(models_dir)  # one bundle for every actor, even if CURRENT moves
    manifest = read_manifest(bundle_dir(models_dir, name))
    encoder = encoder or manifest["default_encoder"]
    if encoder not in manifest["retrievers"]:
        raise ConfigError(
            f"bundle {name} has no encoder {encoder!r} (it has {', '.join(manifest['retrievers'])})"
        )
    if not histories.is_dir() or not any(histories.glob("*.parquet")):
        raise ConfigError(
            f"{histories}: not a folder of .parquet files (write one with "
            "python -m training histories)"
        )
    out = empty_folder(out).resolve()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    size = pool_size(ray.cluster_resources().get("CPU", 0), actors, cpus_per_actor)
    dataset = ray.data.read_parquet(str(histories), file_extensions=["parquet"])
    check_histories_schema(dataset.schema(fetch_if_missing=True).base_schema, histories)
    users = dataset.count()  # from the files' metadata
    # Ray Data hands each actor whole blocks and reads a small file as one: blocks of one
    # batch each spread the work over the pool whatever the files' sizes.
    dataset = dataset.repartition(target_num_rows_per_block=batch_size)
    threads = max(1, math.floor(cpus_per_actor))
    recommended = dataset.map_batches(
        BundleRecommender,
        fn_constructor_kwargs={
            "models_dir": str(models_dir),
            "bundle": name,
            "encoder": encoder,
            "k": k,
            "device": device,
            "threads": threads,
            "histories": str(histories),
            "catalogue": catalogue,
            "exposure": exposure,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=cpus_per_actor,
        num_gpus=1 if device == "gpu" else 0,
    )
    started = time.perf_counter()
    try:
        recommended.write_parquet(str(out))
    except ray.exceptions.RayError as exc:
        # The project's own errors raised in an actor (a malformed history, a bundle that
        # does not load) are reported as themselves, not as Ray's traceback.
        message = project_error(exc)
        if message is None:
            raise
        raise TrainingError(f"{message} (in a Ray actor)") from None
    seconds = time.perf_counter() - started
    rows = ray.data.read_parquet(str(out)).count() if any(out.iterdir()) else 0
    return {
        "users": int(users),
        "rows": int(rows),
        "seconds": seconds,
        "users_per_second": users / seconds if seconds else float("inf"),
        "encoder": encoder,
        "bundle": name,
        "actors": size,
        "catalogue_version": catalogue[0] if catalogue else 0,
    }
