"""Settings refuse unsafe configurations at start-up and come from RECSERVE_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings

TOKEN = "t" * 20


pytestmark = pytest.mark.usefixtures("clean_recserve_environment")


def test_admin_enabled_without_a_token_is_refused():
    with pytest.raises(ValidationError, match="RECSERVE_ADMIN_TOKEN is required"):
        Settings()


def test_admin_without_a_token_is_allowed_in_dev_mode():
    assert Settings(dev_mode=True).admin_token is None


def test_admin_disabled_needs_no_token():
    assert Settings(admin_enabled=False).admin_enabled is False


def test_a_short_admin_token_is_refused():
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(admin_token="short-token")


def test_a_sixteen_character_token_is_accepted_and_kept_secret():
    settings = Settings(admin_token="s" * 16)
    assert settings.admin_token.get_secret_value() == "s" * 16
    assert "s" * 16 not in repr(settings)


def test_settings_come_from_recserve_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSERVE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("RECSERVE_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("RECSERVE_KEY_PREFIX", "staging")
    monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("RECSERVE_HISTORY_CAP", "50")
    monkeypatch.setenv("RECSERVE_RELOAD_POLL_SECONDS", "0")
    settings = Settings()
    assert settings.models_dir == Path(tmp_path)
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.key_prefix == "staging"
    assert settings.admin_token.get_secret_value() == TOKEN
    assert settings.history_cap == 50
    assert settings.reload_poll_seconds == 0


def test_variables_without_the_prefix_are_ignored(monkeypatch):
    monkeypatch.setenv("MODELS_DIR", "/elsewhere")
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    with pytest.raises(ValidationError, match="RECSERVE_ADMIN_TOKEN"):
        Settings()
    assert Settings(dev_mode=True).models_dir == Path("models")


def test_dev_mode_from_the_environment_allows_no_token(monkeypatch):
    monkeypatch.setenv("RECSERVE_DEV_MODE", "1")
    assert Settings().dev_mode is True


@pytest.mark.parametrize("prefix", ["a:b", "a*", "has space", "", "x" * 33, "ü"])
def test_a_key_prefix_that_could_reach_other_keys_is_refused(prefix):
    with pytest.raises(ValidationError, match="key_prefix"):
        Settings(admin_token=TOKEN, key_prefix=prefix)


@pytest.mark.parametrize(
    "field, value",
    [("candidates", 0), ("history_cap", 0), ("device", "tpu"), ("max_body_bytes", 10)],
)
def test_out_of_range_values_are_refused_naming_the_setting(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(admin_token=TOKEN, **{field: value})


def test_the_index_device_defaults_to_the_models_device_and_takes_only_known_ones(monkeypatch):
    assert Settings(dev_mode=True).index_device is None
    monkeypatch.setenv("RECSERVE_INDEX_DEVICE", "gpu")
    assert Settings(dev_mode=True).index_device == "gpu"
    monkeypatch.setenv("RECSERVE_INDEX_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="index_device"):
        Settings(dev_mode=True)
