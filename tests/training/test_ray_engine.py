"""batch-recommend on Ray Data (training.ray_engine): the in-process engine's rows, row for
row, from a local Ray of two CPUs; and the checks that need no Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.training.test_cli import one_error_line
from training.__main__ import main
from training.batch_recommend import check_histories_schema, history_batch, write_histories
from training.errors import ConfigError, DataFormatError
from training.ray_engine import pool_size

# The spec of conftest's tiny_data, which the exported_bundle fixture was trained on.
TINY_SPEC = "synthetic:users=300,items=120,mean_length=20,seed=1"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start costs seconds): two CPUs, as CI's runners."""
    ray = pytest.importorskip(
        "ray", reason="Ray is an optional extra: pip install -e '.[ray]' to run these tests"
    )
    pytest.importorskip("ray.data", reason="the ray extra installs ray[data]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def sorted_rows(table: pa.Table) -> dict:
    """The rows by (user, rank): the Ray engine's partitions come in no fixed order."""
    table = table.sort_by([("user", "ascending"), ("rank", "ascending")])
    return table.to_pydict()


def test_ray_engine_writes_the_in_process_engines_rows(
    local_ray, exported_bundle, tiny_data, tmp_path
):
    """The evaluation's histories (all but the last event), so that the histories written
    are also checked to be those the in-process engine recommends from ("all" has its own
    test of the files below), and the catalogue API's writes (an item withdrawn, one added
    with a vector that wins for many users), which every actor applies as the in-process
    engine does; batches of 64 users make five blocks for the two actors."""
    from service.bundle import load_bundle
    from service.catalogue import ItemRecord
    from service.live_catalogue import ServedCatalogue
    from training.batch_recommend import batch_recommend
    from training.ray_engine import ray_batch_recommend

    models_dir, _ = exported_bundle
    bundle = load_bundle(models_dir, device="cpu")
    withdrawn = str(bundle.catalogue.raw_ids[5])
    huge = np.full(bundle.retrievers["sasrec"].item_vectors.shape[1], 100.0, np.float32)
    records = {
        withdrawn: ItemRecord(withdrawn=True),
        "added": ItemRecord(title="added", vectors=(("sasrec", huge),), vectors_bundle="tiny"),
    }
    histories = tmp_path / "histories"
    code = main(
        ["histories", "--data", TINY_SPEC, "--out", str(histories), "--history", "test",
         "--rows-per-file", "200"]
    )  # fmt: skip
    assert code == 0

    served = ServedCatalogue.of_records(bundle, 2, records, embed=True)
    expected_file = tmp_path / "inprocess.parquet"
    batch_recommend(
        bundle, tiny_data, expected_file, k=10, history="test", batch_size=64, served=served
    )
    stats = ray_batch_recommend(
        models_dir,
        histories,
        tmp_path / "ray",
        k=10,
        batch_size=64,
        actors=2,
        cpus_per_actor=0.5,
        catalogue=(2, records),
    )
    assert stats["actors"] == 2 and stats["catalogue_version"] == 2

    expected = sorted_rows(pq.read_table(expected_file))
    got = sorted_rows(pq.read_table(tmp_path / "ray"))
    assert stats["users"] == len(set(expected["user"])) == len(tiny_data.eval_users())
    assert stats["rows"] == len(expected["user"])
    assert got["user"] == expected["user"]
    assert got["rank"] == expected["rank"]
    assert got["item"] == expected["item"]
    np.testing.assert_allclose(got["score"], expected["score"], rtol=0, atol=1e-5)
    assert "added" in got["item"] and withdrawn not in got["item"]


def test_ray_engine_reports_a_malformed_history_as_one_error_line(
    local_ray, exported_bundle, tmp_path, capsys
):
    models_dir, _ = exported_bundle
    histories = tmp_path / "histories"
    histories.mkdir()
    pq.write_table(
        pa.table({"user": ["u1"], "items": [["1", "2"]], "timestamps": [[10]]}),
        histories / "part-0.parquet",
    )
    code = main(
        ["batch-recommend", "--engine", "ray", "--histories", str(histories),
         "--models-dir", str(models_dir), "--out", str(tmp_path / "out"),
         "--ray-actors", "1"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err  # Ray's own deprecation warnings come before the error
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "user u1: 2 items but 1 timestamps" in errors[0], err


# ------------------------------------------------------------------------ without Ray


def test_a_pool_that_holds_every_cpu_is_refused():
    assert pool_size(2, None, 1.0) == 1
    assert pool_size(2, 2, 0.5) == 2
    assert pool_size(16, None, 1.0) == 15
    with pytest.raises(ConfigError, match="wait forever"):
        pool_size(2, 2, 1.0)
    with pytest.raises(ConfigError, match="at least 1"):
        pool_size(2, 0, 0.5)


def test_history_batch_maps_raw_ids_and_sorts_each_history_by_time(exported_bundle):
    from service.bundle import load_bundle

    models_dir, _ = exported_bundle
    catalogue = load_bundle(models_dir, models=False).catalogue
    known = catalogue.raw_ids[1:4].tolist()
    table = pa.table(
        {
            "user": ["a", "b"],
            "items": [[known[0], "no-such-item", known[1]], [known[2]]],
            "timestamps": [[30, 10, 20], [5]],
        }
    )
    users, items, stamps, starts, ends = history_batch(table, catalogue, "histories/")
    assert users.tolist() == ["a", "b"]
    assert starts.tolist() == [0, 3] and ends.tolist() == [3, 4]
    assert stamps.tolist() == [10, 20, 30, 5]
    ids = catalogue.internal_ids([known[1], known[0], known[2]])
    assert items.tolist() == [0, ids[0], ids[1], ids[2]]  # unknown: 0, as in process


def test_histories_files_hold_each_users_history_in_time_order(tiny_data, tmp_path):
    counts = write_histories(tiny_data, tmp_path / "h", rows_per_file=100)
    assert counts == {"users": 300, "events": len(tiny_data.items), "files": 3}
    table = pq.read_table(tmp_path / "h")
    check_histories_schema(table.schema, tmp_path / "h")
    user = 7
    span = slice(tiny_data.offsets[user], tiny_data.offsets[user + 1])
    row = table.filter(pa.compute.equal(table["user"], tiny_data.user_map.raw[user + 1]))
    assert row["items"][0].as_py() == tiny_data.item_map.raw[tiny_data.items[span]].tolist()
    assert row["timestamps"][0].as_py() == tiny_data.timestamps[span].tolist()
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_histories(tiny_data, tmp_path / "h")


def test_histories_of_another_shape_are_refused(tmp_path):
    schema = pa.schema([("user", pa.string()), ("items", pa.list_(pa.int64()))])
    with pytest.raises(DataFormatError, match="column 'items' is list<item: int64>"):
        check_histories_schema(schema, tmp_path)
    schema = pa.schema([("user", pa.string()), ("items", pa.list_(pa.string()))])
    with pytest.raises(DataFormatError, match="no column 'timestamps'"):
        check_histories_schema(schema, tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "ray", "--data", "synthetic"], "--data is not taken by --engine ray"),
        (["--engine", "ray", "--history", "test"], "--history is not taken by --engine ray"),
        (["--engine", "ray"], "--engine ray needs --histories DIR"),
        ([], "batch-recommend needs --data"),
        (["--data", "synthetic", "--histories", "h"], "--histories: only with --engine ray"),
    ],
)
def test_each_engine_refuses_the_other_engines_input(tmp_path, capsys, argv, message):
    code = main(["batch-recommend", "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message in one_error_line(capsys)
