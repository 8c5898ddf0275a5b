"""Settings from the command line and the environment, and the command's own behaviour."""

import subprocess
import sys

import pytest

from polykit_cache import cli, config
from polykit_cache.config import Config, parse, parse_size


def test_defaults():
    cfg = parse([], {})
    assert cfg == Config()
    assert str(cfg.storage_dir) == "cache" and cfg.bind == "127.0.0.1" and cfg.port == 8080
    assert cfg.max_artifact_size == 1 << 30 and cfg.unpacked_limit == 64 << 30


def test_every_option_from_flags_env_and_alias():
    env = {"POLYKIT_CACHE_PORT": "9000", "POLYKIT_CACHE_THREADS": "2", "POLYKIT_CACHE_BIND": "0.0.0.0",
           "POLYKIT_CACHE_STORAGE_DIR": "/srv/c", "POLYKIT_CACHE_MAX_ARTIFACT_SIZE": "2G",
           "POLYKIT_CACHE_MAX_UNPACKED_SIZE": "3G", "POLYKIT_CACHE_LOG_LEVEL": "debug"}
    cfg = parse([], env)
    assert (cfg.port, cfg.threads, cfg.bind, str(cfg.storage_dir)) == (9000, 2, "0.0.0.0", "/srv/c")
    assert (cfg.max_artifact_size, cfg.unpacked_limit, cfg.log_level) == (2 << 30, 3 << 30, "DEBUG")
    # the command line wins over the environment
    assert parse(["--port", "7000"], env).port == 7000
    assert parse(["--max-size", "10M"], env).max_artifact_size == 10 << 20
    assert parse(["--max-artifact-size", "123"], {}).max_artifact_size == 123
    assert parse([], {"POLYKIT_CACHE_WORKERS": "3"}).workers == 3 and parse([], {}).workers == 1


@pytest.mark.parametrize("text,value", [("1024", 1024), ("1k", 1024), ("512M", 512 << 20), ("1GiB", 1 << 30), ("2 GB", 2 << 30)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("args,env", [(["--port", "70000"], {}), (["--threads", "0"], {}),
                                       ([], {"POLYKIT_CACHE_MAX_SIZE": "x", "POLYKIT_CACHE_MAX_ARTIFACT_SIZE": "lots"}),
                                       (["--log-level", "loud"], {}), (["--workers", "0"], {}),
                                       ([], {"POLYKIT_CACHE_WORKERS": "65"})])
def test_bad_values_are_clear_errors(args, env, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in config.OPTIONS:
        assert opt.flag in out.stdout and opt.env in out.stdout
    assert "--max-size" in out.stdout
    top = subprocess.run([sys.executable, "-m", "polykit_cache", "--help"], capture_output=True, text=True)
    assert "serve" in top.stdout and "verify" in top.stdout


def test_version():
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("polykit-cache ")


def test_an_unusable_port_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "polykit_cache", "--port", str(port), "--storage-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_switches_and_lists_from_flags_and_environment():
    assert parse(["--allow-anonymous-read"], {}).allow_anonymous_read is True
    assert parse([], {"POLYKIT_CACHE_ALLOW_ANONYMOUS_READ": "true"}).allow_anonymous_read is True
    assert parse([], {"POLYKIT_CACHE_ALLOW_ANONYMOUS_READ": "0"}).allow_anonymous_read is False
    cfg = parse(["--trusted-proxy", "10.0.0.5", "--trusted-proxy-headers", "x-forwarded-for,x-forwarded-proto"], {})
    assert cfg.trusted_proxy == "10.0.0.5" and cfg.trusted_proxy_headers == ("x-forwarded-for", "x-forwarded-proto")
    from polykit_cache.server import waitress_settings

    settings = waitress_settings(cfg)
    assert settings["trusted_proxy"] == "10.0.0.5" and settings["trusted_proxy_headers"] == {"x-forwarded-for", "x-forwarded-proto"}
    assert "trusted_proxy" not in waitress_settings(parse([], {}))
    assert parse(["--max-storage", "10G", "--access-log-format", "JSON"], {}).max_storage == 10 << 30
    with pytest.raises(SystemExit):
        cli.main(["serve", "--trusted-proxy-headers", "x-real-ip"])
    with pytest.raises(SystemExit):
        cli.main(["serve", "--access-log-format", "xml"])


def test_connection_bounds_reach_waitress():
    from polykit_cache.server import waitress_settings

    defaults = waitress_settings(parse([], {}))
    assert (defaults["connection_limit"], defaults["channel_timeout"]) == (200, 60)
    cfg = parse(["--max-connections", "50"], {"POLYKIT_CACHE_IDLE_TIMEOUT": "3"})
    settings = waitress_settings(cfg)
    assert (settings["connection_limit"], settings["channel_timeout"], settings["cleanup_interval"]) == (50, 3, 3)
    with pytest.raises(ValueError):
        parse(["--max-connections", "0"], {})


def test_waitress_warns_of_queued_requests_only_at_debug_level():
    """Requests waiting for a worker thread are normal under load: no log line per request."""
    import logging

    queue, access = logging.getLogger("waitress.queue"), logging.getLogger("polykit_cache.access")
    before = queue.level, access.level, access.propagate, list(access.handlers)
    try:
        config.setup_logging("INFO")
        assert not queue.isEnabledFor(logging.WARNING)
        assert queue.isEnabledFor(logging.ERROR)
        config.setup_logging("DEBUG")
        assert queue.isEnabledFor(logging.WARNING)
    finally:
        queue.setLevel(before[0])
        access.setLevel(before[1])
        access.propagate = before[2]
        access.handlers[:] = before[3]
