"""Experiments and feedback: assignment, impressions, attribution, counts and the report."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from service.attribution import AttributionRules, Feedback, attribute, marks_for
from service.errors import ExperimentError, InvalidField
from service.experiments import Arm, Experiment, assign, check_arm, load_experiment
from service.feedback_store import Shown
from service.main import create_app
from service.metrics import Metrics
from service.report import Rate, arm_figures, difference, table, wilson
from tests.service.conftest import ADMIN_TOKEN, ON_BOTH_REDIS, wait_until

RERANK_ARMS = {
    "name": "rerank-test",
    "arms": [
        {"name": "control", "weight": 1, "rerank": False},
        {"name": "head", "weight": 1, "rerank": True},
    ],
}


def experiment_of(document: dict) -> Experiment:
    return Experiment.model_validate(document)


# --------------------------------------------------------------------------- assignment


def test_assignment_is_sticky_and_follows_the_weights():
    experiment = experiment_of(
        {"name": "w", "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}
    )
    users = [f"user-{i}" for i in range(20_000)]
    arms = [experiment.assign(user).name for user in users]
    shares = Counter(arms)
    # Binomial standard deviation at n=20,000, p=0.25: 0.0031; 4 of them.
    assert abs(shares["a"] / len(users) - 0.25) < 0.0125
    # The same user, asked again (another worker, another replica): the same arm.
    again = experiment_of(
        {"name": "w", "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}
    )
    assert [again.assign(user).name for user in users[:2000]] == arms[:2000]


def test_a_new_salt_reshuffles_the_users():
    arms = [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]
    first = experiment_of({"name": "x", "arms": arms})
    second = experiment_of({"name": "x", "salt": "round-2", "arms": arms})
    users = [str(i) for i in range(4000)]
    same = sum(first.assign(u).name == second.assign(u).name for u in users)
    assert 0.45 < same / len(users) < 0.55  # independent draws agree half the time


def test_a_request_may_name_its_arm_and_is_then_forced():
    experiment = experiment_of(RERANK_ARMS)
    forced = assign(experiment, "u1", "head")
    assert forced.arm.name == "head" and forced.forced
    assert not assign(experiment, "u1", None).forced
    with pytest.raises(InvalidField, match="body.arm: no arm 'nope'"):
        assign(experiment, "u1", "nope")
    with pytest.raises(InvalidField, match="no experiment is running"):
        assign(None, "u1", "head")
    assert assign(None, "u1", None).arm_name == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "exp.json:1: not JSON"),
        ('{"name": "x", "arms": []}', "exp.json: arms:"),
        ('{"name": "x", "arms": [{"name": "a", "weight": 0}]}', "exp.json: arms.0.weight:"),
        (
            '{"name": "x", "arms": [{"name": "a", "weight": 1}, {"name": "a", "weight": 1}]}',
            "two arms have the same name",
        ),
        ('{"name": "none", "arms": [{"name": "a", "weight": 1}]}', "stands for no experiment"),
        ('{"name": "x", "arms": [{"name": "a", "weight": 1, "k": 3}]}', "arms.0.k:"),
    ],
)
def test_a_bad_experiment_file_is_refused_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "exp.json"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=message.replace(".", r"\.")):
        load_experiment(path)


def test_an_arm_needs_what_it_asks_of_the_bundle():
    gone = Arm(name="a", weight=1, encoder="gone")
    with pytest.raises(ExperimentError, match="arm a: the bundle has no retriever 'gone'"):
        check_arm(gone, {"sasrec": True}, "sasrec")
    headless = Arm(name="a", weight=1, rerank=True)
    with pytest.raises(ExperimentError, match="has no CTR head"):
        check_arm(headless, {"sasrec": False}, "sasrec")
    check_arm(headless, {"sasrec": True}, "sasrec")


# --------------------------------------------------------------------------- attribution


def shown(rid: str, items: list[str], at: float, user: str = "u") -> Shown:
    return Shown(rid, user, "e", "a", False, at, tuple(items))


def test_a_typed_event_goes_to_the_latest_impression_showing_its_item_and_hits_all():
    rules = AttributionRules(window=100, skew=5, hit_k=2)
    older, newer = shown("r1", ["x", "y"], 10.0), shown("r2", ["z", "x"], 20.0)
    far = shown("r3", ["q", "w", "x"], 25.0)  # shows x, but below hit_k
    marks = marks_for(Feedback("u", "x", 30, type="click"), [older, newer, far], rules)
    described = {(m.shown.request_id, m.field) for m in marks}
    assert described == {
        ("r3", "o:click"),
        ("r3", "e:click:x"),
        ("r1", "hit"),
        ("r2", "hit"),
    }
    # An untyped event attributes nothing but may still make hits.
    untyped = marks_for(Feedback("u", "x", 30), [older], rules)
    assert [(m.shown.request_id, m.field) for m in untyped] == [("r1", "hit")]
    assert marks_for(Feedback("u", "nothing-shown", 30, type="click"), [older], rules) == []


class LateImpressions:
    """A feedback store whose impressions arrive after ``reads_before`` reads of them, as
    those of another worker do while they linger behind its answers."""

    def __init__(self, impressions: list[Shown], reads_before: int):
        self.impressions = {shown.request_id: shown for shown in impressions}
        self.reads_before = reads_before
        self.reads = 0
        self.marks = []

    async def shown(self, request_ids):
        self.reads += 1
        here = self.reads > self.reads_before
        return [self.impressions.get(rid) if here else None for rid in request_ids]

    async def recent(self, users, since, until):
        return [[] for _ in users]

    async def mark(self, marks):
        self.marks += marks
        return [True] * len(marks)


@pytest.mark.parametrize(
    ("unwritten_seconds", "reads_before", "age", "attributed"),
    [(0.0, 1, 0, 0), (0.02, 1, 0, 1), (0.02, 2, 0, 0), (0.02, 0, 0, 1), (0.02, 1, 60, 0)],
)
def test_a_named_impression_not_yet_written_is_read_again_after_its_linger(
    unwritten_seconds, reads_before, age, attributed
):
    now = int(time.time())
    rules = AttributionRules(window=100, skew=5, hit_k=2, unwritten_seconds=unwritten_seconds)
    store = LateImpressions([shown("r1", ["x", "y"], now - age - 1.0)], reads_before)
    click = Feedback("u", "x", now - age, type="click", request_id="r1")
    assert asyncio.run(attribute(store, [click], rules, Metrics())) == attributed
    # One read when found at once, when nothing is awaited, or for an event too old to
    # answer an impression still on its way; two otherwise, never more.
    waits = reads_before > 0 and unwritten_seconds > 0 and age < rules.skew
    assert store.reads == (2 if waits else 1)
    expected = {"o:click", "e:click:x", "hit"} if attributed else set()
    assert {m.field for m in store.marks} == expected


# --------------------------------------------------------------------------- the report


def test_the_report_computes_rates_intervals_and_differences_by_hand():
    counts = {
        "control|impressions": 200,
        "control|click": 20,
        "control|click:events": 25,
        "control|hit": 30,
        "head|impressions": 100,
        "head|click": 25,
        "head|click:events": 26,
        "head|hit": 35,
    }
    figures = arm_figures(counts, ["click", "hit"], ["control"])
    assert [f.arm for f in figures] == ["control", "head"]
    head = figures[1]
    assert head.impressions == 100 and head.rates["click"].count == 25
    assert head.events == {"click": 26}
    # Wilson at 25/100: centre (0.25 + 1.92/100)/(1.0384), half 1.96*sqrt(.1875/100 + .00096)/1.0384
    low, high = wilson(25, 100)
    assert low == pytest.approx(0.1754, abs=1e-4) and high == pytest.approx(0.3430, abs=1e-4)
    delta, d_low, d_high = difference(head.rates["click"], figures[0].rates["click"])
    half = 1.959964 * ((0.25 * 0.75 / 100 + 0.1 * 0.9 / 200) ** 0.5)
    assert delta == pytest.approx(0.15)
    assert (d_low, d_high) == (pytest.approx(0.15 - half), pytest.approx(0.15 + half))
    text = table("x", figures, hit_k=10)
    assert "hit rate at 10" in text and "25 / 100" in text and "+0.1500" in text
    assert Rate(0, 0, *wilson(0, 0)).n == 0


# --------------------------------------------------------------------------- over the API


@pytest.fixture
def experiment_file(tmp_path):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(RERANK_ARMS))
    return path


@pytest.fixture
def served(make_settings, head_models, experiment_file, shared_redis):
    """An app serving the head bundle with the rerank experiment, and its Redis."""
    settings = make_settings(models_dir=head_models, experiment_file=experiment_file)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def click_on(answer: dict, user: str) -> dict:
    """A click, now, on the first item of a /recommend ``answer`` given to ``user``."""
    return {
        "user_id": user,
        "item_id": answer["items"][0]["item_id"],
        "ts": int(time.time()),
        "type": "click",
        "request_id": answer["request_id"],
    }


def counts_of(redis, settings, experiment="rerank-test") -> dict[str, int]:
    from service.reload_signals import deployment_id

    key = f"{{{settings.key_prefix}:feedback:{deployment_id(settings)}}}:experiment:{experiment}"
    return {k.decode(): int(v) for k, v in redis.hgetall(key).items()}


def test_answers_carry_their_arm_and_the_arm_decides_the_rerank(served, history):
    client, _ = served
    seen = {}
    for i in range(40):
        body = client.post("/recommend", json={"user_id": f"u{i}", "history": history}).json()
        assert body["experiment"] == "rerank-test" and len(body["request_id"]) == 32
        # The arm wins over what the request says.
        seen.setdefault(body["arm"], set()).add(body["reranked"])
        again = client.post(
            "/recommend", json={"user_id": f"u{i}", "history": history, "rerank": True}
        ).json()
        assert again["arm"] == body["arm"] and again["reranked"] == body["reranked"]
        assert again["request_id"] != body["request_id"]
    assert seen == {"control": {False}, "head": {True}}
    forced = client.post(
        "/recommend", json={"user_id": "u0", "history": history, "arm": "head"}
    ).json()
    assert forced["arm"] == "head" and forced["reranked"] is True
    bad = client.post("/recommend", json={"user_id": "u0", "history": history, "arm": "zz"})
    assert bad.status_code == 422 and "body.arm" in bad.text


@ON_BOTH_REDIS
def test_clicks_are_attributed_by_request_id_and_by_window_once(
    served, history, redis_client, monkeypatch, capsys, tmp_path
):
    client, settings = served
    answer = client.post("/recommend", json={"user_id": "alice", "history": history}).json()
    arm, rid = answer["arm"], answer["request_id"]
    shown_ids = [item["item_id"] for item in answer["items"]]
    wait_until(lambda: counts_of(redis_client, settings).get(f"{arm}|impressions") == 1, 10)
    now = int(time.time())
    click = {"user_id": "alice", "item_id": shown_ids[2], "ts": now, "type": "click"}
    first = client.post("/events", json={**click, "request_id": rid}).json()
    retry = client.post("/events", json={**click, "request_id": rid}).json()
    assert first["attributed"] == 1 and retry["attributed"] == 1
    # Another item of the same impression, found by the window (no request id).
    second = {"user_id": "alice", "item_id": shown_ids[0], "ts": now + 1, "type": "click"}
    assert client.post("/events", json=second).json()["attributed"] == 1
    # A purchase of an item never shown, and another user's claim on the request id.
    assert (
        client.post("/events", json={**click, "item_id": "no-such", "type": "purchase"}).json()[
            "attributed"
        ]
        == 0
    )
    mallory = {**click, "user_id": "mallory", "request_id": rid}
    assert client.post("/events", json=mallory).json()["attributed"] == 0
    counts = counts_of(redis_client, settings)
    assert counts == {
        f"{arm}|impressions": 1,
        f"{arm}|click": 1,  # one impression was clicked ...
        f"{arm}|click:events": 2,  # ... on two of its items
        f"{arm}|hit": 1,
    }
    metrics = client.get("/metrics").text
    labels = f'arm="{arm}",experiment="rerank-test"'
    assert f'recserve_experiment_outcomes_total{{{labels},outcome="click"}} 1.0' in metrics
    assert f'recserve_attributed_events_total{{{labels},type="click"}} 2.0' in metrics
    assert f"recserve_impressions_total{{{labels}}} 1.0" in metrics
    # The report finds the same counts with the service's own settings.
    from service import report

    for name, value in {
        "MODELS_DIR": settings.models_dir,
        "REDIS_URL": settings.redis_url,
        "KEY_PREFIX": settings.key_prefix,
        "EXPERIMENT_FILE": settings.experiment_file,
    }.items():
        monkeypatch.setenv(f"RECSERVE_{name}", str(value))
    assert report.main(["--png", str(tmp_path / "report.png")]) == 0
    printed = capsys.readouterr().out
    assert "experiment rerank-test: control arm control" in printed
    assert f"{arm:<20}       1 / 1       1.0000" in printed  # clicked, and a hit
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_an_event_outside_the_window_is_not_attributed(make_settings, head_models, history):
    settings = make_settings(models_dir=head_models, attribution_window_seconds=60)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/recommend", json={"user_id": "bob", "history": history}).json()
        item = answer["items"][0]["item_id"]
        late = {"user_id": "bob", "item_id": item, "ts": int(time.time()) + 600, "type": "view"}
        time.sleep(0.3)  # the impression is written behind the answer
        assert client.post("/events", json=late).json()["attributed"] == 0
        on_time = {**late, "ts": int(time.time())}
        assert wait_until(
            lambda: client.post("/events", json=on_time).json()["attributed"] == 1, 10
        )


def test_an_unknown_event_type_is_422_naming_it(served):
    client, _ = served
    event = {"user_id": "u", "item_id": "1", "ts": 1, "type": "like"}
    response = client.post("/events", json=[event])
    assert response.status_code == 422
    assert "body[0].type: 'like' is not one of view, click, purchase" in response.text


def test_a_forced_answer_is_logged_but_never_counted(served, history, shared_redis):
    client, settings = served
    answer = client.post(
        "/recommend", json={"user_id": "carol", "history": history, "arm": "control"}
    ).json()
    click = click_on(answer, "carol")
    assert wait_until(lambda: client.post("/events", json=click).json()["attributed"] == 1, 10)
    assert counts_of(shared_redis, settings) == {}


def test_redis_down_drops_impressions_without_failing_answers(
    make_settings, head_models, history, redis_server
):
    settings = make_settings(models_dir=head_models, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as client:
        redis_server.stop()
        for _ in range(3):
            response = client.post("/recommend", json={"history": history})
            assert response.status_code == 200 and response.json()["items"]

        def dropped() -> float:
            for line in client.get("/metrics").text.splitlines():
                if line.startswith('recserve_impressions_dropped_total{reason="redis"}'):
                    return float(line.split()[-1])
            return 0.0

        assert wait_until(lambda: dropped() == 3.0, 10)


def test_a_bad_experiment_refuses_the_reload_and_the_old_one_keeps_serving(
    make_settings, head_models, experiment_file, history
):
    settings = make_settings(models_dir=head_models, experiment_file=experiment_file)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings)) as client:
        experiment_file.write_text(
            json.dumps({"name": "y", "arms": [{"name": "a", "weight": 1, "encoder": "gone"}]})
        )
        refused = client.post("/admin/reload", headers=admin)
        assert refused.status_code == 409 and "arm a: the bundle has no retriever" in refused.text
        body = client.post("/recommend", json={"user_id": "u", "history": history}).json()
        assert body["experiment"] == "rerank-test"
        experiment_file.write_text(json.dumps({**RERANK_ARMS, "name": "second"}))
        assert client.post("/admin/reload", headers=admin).status_code == 200
        body = client.post("/recommend", json={"user_id": "u", "history": history}).json()
        assert body["experiment"] == "second"
        ready = client.get("/readyz", headers=admin).json()
        assert ready["experiment"] == {
            "name": "second",
            "arms": {"control": 0.5, "head": 0.5},
            "bundles": [],
        }
        assert "experiment" not in client.get("/readyz").json()


def test_the_start_refuses_a_bad_experiment_file_in_one_line(
    tmp_path, monkeypatch, capsys, clean_recserve_environment
):
    from service import serve

    path = tmp_path / "exp.json"
    path.write_text('{"name": "x", "arms": [{"name": "a", "weight": -1}]}')
    monkeypatch.setenv("RECSERVE_DEV_MODE", "1")
    monkeypatch.setenv("RECSERVE_EXPERIMENT_FILE", str(path))
    with pytest.raises(SystemExit) as exit_info:
        serve.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"recserve: {path}: arms.0.weight: Input should be greater than 0\n"
    )


def test_an_arm_may_serve_another_bundle_beside_current(
    make_settings, served_models, second_bundle, tmp_path, history
):
    shutil.copytree(second_bundle, served_models / second_bundle.name)
    path = tmp_path / "bundles.json"
    arms = [{"name": "old", "weight": 1}, {"name": "new", "weight": 1, "bundle": "tiny-v2"}]
    path.write_text(json.dumps({"name": "bundles", "arms": arms}))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(make_settings(experiment_file=path))) as client:
        served = {}
        for i in range(30):
            body = client.post("/recommend", json={"user_id": f"u{i}", "history": history})
            served.setdefault(body.json()["arm"], set()).add(body.json()["bundle"])
        assert served == {"old": {"tiny"}, "new": {"tiny-v2"}}
        assert client.get("/readyz", headers=admin).json()["experiment"]["bundles"] == ["tiny-v2"]
        state = client.app.state.recserve
        second = state.arm_recommenders["tiny-v2"]
        # A reload keeps what it still serves, and a bundle no arm names any more goes.
        assert client.post("/admin/reload", headers=admin).status_code == 200
        assert state.arm_recommenders["tiny-v2"] is second
        path.write_text(json.dumps({**RERANK_ARMS, "arms": [{"name": "only", "weight": 1}]}))
        assert client.post("/admin/reload", headers=admin).status_code == 200
        assert state.arm_recommenders == {} and second not in state.serving()
        body = client.post("/recommend", json={"user_id": "u1", "history": history}).json()
        assert (body["arm"], body["bundle"]) == ("only", "tiny")
        # An arm naming a bundle the models dir lacks refuses the reload, naming it.
        arms[1]["bundle"] = "missing"
        path.write_text(json.dumps({"name": "bundles", "arms": arms}))
        refused = client.post("/admin/reload", headers=admin)
        assert refused.status_code == 409 and "missing" in refused.text
        assert client.post("/recommend", json={"history": history}).json()["arm"] == "only"


def test_impressions_lingering_at_shutdown_are_written(
    make_settings, head_models, history, shared_redis
):
    settings = make_settings(models_dir=head_models, write_linger_ms=1000)  # the most allowed
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        for _ in range(3):
            response = client.post("/recommend", json={"user_id": "erin", "history": history})
            assert response.status_code == 200
        lingering = counts_of(shared_redis, settings, experiment="none")
        quick = time.monotonic() - started < 0.8
    # Still lingering when counted (unless this machine took most of the linger to answer),
    # and the shutdown wrote all three.
    assert lingering == {} or not quick
    assert counts_of(shared_redis, settings, experiment="none") == {"none|impressions": 3}


def test_an_event_right_after_its_answer_finds_the_lingering_impression(
    make_settings, head_models, history, shared_redis
):
    settings = make_settings(models_dir=head_models, write_linger_ms=1000)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/recommend", json={"user_id": "frank", "history": history}).json()
        click = click_on(answer, "frank")
        # No waiting: the impression is still in the worker's queue when the click comes.
        assert client.post("/events", json=click).json()["attributed"] == 1
