"""Reload signals: what the reload channel accepts, and which deployment hears it."""

from __future__ import annotations

import json

import pytest

from service.reload_signals import MAX_AGE_SECONDS, ReloadSignals, deployment_id
from service.settings import Settings

TOKEN = "a-long-enough-admin-token"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(clock=None, **options):
    """A publishing and a listening worker of one deployment."""
    clock = clock or Clock()
    return (
        ReloadSignals("p", "dep", TOKEN, clock=clock, **options),
        ReloadSignals("p", "dep", TOKEN, clock=clock, **options),
    )


def test_a_signal_is_accepted_once():
    sender, listener = pair()
    signal = sender.sign()
    assert listener.check(signal) == "accepted"
    assert listener.check(signal) == "replayed"
    assert listener.check(sender.sign()) == "accepted"  # a new one is


@pytest.mark.parametrize(
    "message",
    [b"ml100k", b"", None, b"{}", b"[1]", b"\xff\xfe", b"{" * 5000, b'{"v": 1}'],
    ids=["bundle name", "empty", "none", "empty object", "list", "binary", "huge", "partial"],
)
def test_anything_but_a_signal_is_unsigned(message):
    _, listener = pair()
    assert listener.check(message) == "unsigned"


def test_a_signal_names_no_bundle():
    sender, _ = pair()
    assert set(json.loads(sender.sign())) == {"v", "deployment", "ts", "nonce", "mac"}


def test_a_changed_field_breaks_the_signature():
    sender, listener = pair()
    for field, value in (("ts", 1_700_000_001.0), ("nonce", "other"), ("mac", "0" * 64)):
        message = json.loads(sender.sign())
        message[field] = value
        assert listener.check(json.dumps(message)) == "bad_signature", field
    message = json.loads(sender.sign())
    message["mac"] = ""
    assert listener.check(json.dumps(message)) == "unsigned"


def test_another_token_or_deployment_is_refused():
    clock = Clock()
    listener = ReloadSignals("p", "dep", TOKEN, clock=clock)
    assert listener.check(ReloadSignals("p", "dep", TOKEN + "x", clock=clock).sign()) == (
        "bad_signature"
    )
    # Copied from another deployment's channel (the same token): its id is in the MAC.
    elsewhere = json.loads(ReloadSignals("p", "other", TOKEN, clock=clock).sign())
    assert listener.check(json.dumps(elsewhere)) == "other_deployment"
    elsewhere["deployment"] = "dep"
    assert listener.check(json.dumps(elsewhere)) == "bad_signature"


def test_an_old_or_future_signal_is_stale():
    clock = Clock()
    sender, listener = pair(clock)
    signed_at = clock.now
    old = sender.sign()
    clock.now = signed_at + MAX_AGE_SECONDS + 1
    assert listener.check(old) == "stale"
    clock.now = signed_at + MAX_AGE_SECONDS / 2
    assert listener.check(old) == "accepted"  # within the window
    future = sender.sign()
    clock.now -= MAX_AGE_SECONDS + 1  # the listener's clock behind the sender's
    assert listener.check(future) == "stale"


def test_remembered_nonces_are_forgotten_once_their_signal_is_stale():
    clock = Clock()
    sender, listener = pair(clock)
    for _ in range(100):
        assert listener.check(sender.sign()) == "accepted"
        clock.now += 10
    assert len(listener._nonces) <= 2 * MAX_AGE_SECONDS / 10 + 1


def test_without_a_token_only_dev_mode_hears_signals():
    assert not ReloadSignals("p", "dep", None).enabled
    assert ReloadSignals("p", "dep", None).check(ReloadSignals("p", "dep", TOKEN).sign()) == (
        "unsigned"
    )
    dev = ReloadSignals("p", "dep", None, dev_mode=True)
    assert dev.enabled and dev.check(dev.sign()) == "accepted"
    assert ReloadSignals("p", "dep", TOKEN).check(dev.sign()) == "unsigned"


def test_the_deployment_comes_from_the_setting_or_the_models_dir(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)

    def of(**values):
        return deployment_id(Settings(dev_mode=True, **values))

    assert of(models_dir=tmp_path / "a") == of(models_dir="a") == of(models_dir=tmp_path / "link")
    assert of(models_dir="a") != of(models_dir="b")
    assert of(models_dir="a", deployment="blue") == "blue"
    settings = Settings(dev_mode=True, models_dir="a", key_prefix="rs", deployment="blue")
    assert ReloadSignals.from_settings(settings).channel == "rs:reload:blue"
    with pytest.raises(ValueError):
        Settings(dev_mode=True, deployment="a:b*")
