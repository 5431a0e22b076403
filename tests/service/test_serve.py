"""service/serve.py: the one start command, its limits taken from the settings."""

from __future__ import annotations

import logging
import pickle

import pytest

from service.http_protocol import HttpLimits, LimitedHttpTools
from service.serve import BoundedArgs, log_config, main, uvicorn_options
from service.settings import Settings

TOKEN = "t" * 20


pytestmark = pytest.mark.usefixtures("clean_recserve_environment")


def test_the_limits_come_from_the_settings():
    settings = Settings(
        admin_token=TOKEN,
        max_header_bytes=8192,
        max_headers=50,
        header_timeout_seconds=3,
        body_timeout_seconds=7,
        keepalive_timeout_seconds=2,
    )
    options = uvicorn_options(settings)
    assert options["http"].func is LimitedHttpTools
    assert options["http"].keywords["limits"] == HttpLimits(
        max_header_bytes=8192, max_headers=50, header_timeout=3, body_timeout=7
    )
    assert options["timeout_keep_alive"] == 2
    assert options["ws"] == "none" and options["server_header"] is False
    # Several workers are spawned processes: the protocol travels pickled.
    assert pickle.loads(pickle.dumps(options["http"])).keywords == options["http"].keywords


def test_the_defaults_bound_every_request(monkeypatch):
    monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
    settings = Settings()
    assert settings.max_header_bytes == 16_384 and settings.max_headers == 100
    assert settings.header_timeout_seconds == 10 and settings.body_timeout_seconds == 30
    assert settings.keepalive_timeout_seconds == 5


def test_an_invalid_environment_ends_the_start_with_one_line_per_setting(monkeypatch, capsys):
    monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("RECSERVE_MAX_HEADER_BYTES", "12")
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recserve: invalid setting max_header_bytes:") and err.count("\n") == 1


def test_the_access_log_copies_only_an_excerpt_of_a_path():
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/" + "a" * 15_000, "1.1", 404),
        None,
    )
    assert BoundedArgs().filter(record)
    assert len(record.getMessage()) < 400 and "(+14801 characters)" in record.getMessage()
    assert log_config()["handlers"]["access"]["filters"] == ["bounded"]
