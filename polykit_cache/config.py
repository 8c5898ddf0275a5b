"""The server's settings: one frozen dataclass, fed by one table for the command line and environment.

Every option ``--some-name`` can also be set as ``POLYKIT_CACHE_SOME_NAME``; the command line wins
over the environment, which wins over the default. Sizes accept suffixes (``512M``, ``1GiB``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

ENV_PREFIX = "POLYKIT_CACHE_"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``512M``, ``1GiB`` or ``2 GB`` (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (try 1073741824, 512M or 1GiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return port


def parse_positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


# Worker processes: each holds its own threads, connections and memory, so their number is bounded.
MAX_WORKERS = 64


def parse_workers(text: str) -> int:
    value = parse_positive(text)
    if value > MAX_WORKERS:
        raise ValueError(f"{value} workers is more than {MAX_WORKERS}")
    return value


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a yes/no value: {text!r} (use 1 or 0, true or false)")


def parse_access_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("common", "json", "off"):
        raise ValueError(f"unknown access log format {text!r} (common, json or off)")
    return value


def parse_proxy_headers(text: str) -> tuple[str, ...]:
    known = ("x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-by", "forwarded")
    names = tuple(name.strip().lower() for name in text.replace(",", " ").split() if name.strip())
    for name in names:
        if name not in known:
            raise ValueError(f"unknown proxy header {name!r} (known: {', '.join(known)})")
    return names


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``15m``, ``12h`` or ``30d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 300, 15m, 12h or 30d)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_storage_url(text: str) -> str | None:
    """``s3://BUCKET/PREFIX`` (the prefix may be empty); ``disk`` or empty for the storage folder."""
    value = text.strip()
    if value in ("", "disk"):
        return None
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9_./-]*)?", value)
    if not match:
        raise ValueError(f"not a storage URL: {text!r} (s3://BUCKET/PREFIX, or disk)")
    return value


def parse_addressing(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "path", "virtual"):
        raise ValueError(f"unknown addressing style {text!r} (auto, path or virtual)")
    return value


def parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"unknown log level {text!r} (debug, info, warning, error)")
    return level


@dataclass(frozen=True)
class Config:
    """Everything the server needs to know, decided once at start-up."""

    # Root of the artifact store; created when missing.
    storage_dir: Path = Path("cache")
    # Address to listen on; 127.0.0.1 keeps a fresh install private. Use 0.0.0.0 for a team server.
    bind: str = "127.0.0.1"
    port: int = 8080
    # Largest compressed artifact accepted (a body of exactly this size is accepted).
    max_artifact_size: int = 1 << 30
    # Largest decompressed size of one artifact; None means 64 x max_artifact_size.
    max_unpacked_size: int | None = None
    # Total bytes of artifacts kept; beyond it the least recently used are evicted. None: no bound.
    max_storage: int | None = None
    # Worker threads that run requests; waitress's own I/O thread moves the bytes.
    threads: int = 4
    # Worker processes serving one storage (each with its own threads): one Python process uses
    # one core. Above 1, a supervisor process binds the port, starts them and restarts any that dies.
    workers: int = 1
    # Open client connections; at the limit the one idle longest is closed to make room, so idle
    # or half-sent connections never lock other clients out. Each may hold a spool file too.
    max_connections: int = 200
    # Seconds a connection may sit with no request in progress and no traffic before it is closed.
    idle_timeout: int = 60
    log_level: str = "INFO"
    # "role token" lines (roles read and read-write); without tokens the server is open.
    token_file: Path | None = None
    # Let requests without a token read (pull-request builds); writes still need a token.
    allow_anonymous_read: bool = False
    # One line per request on stderr: "common" (NCSA common log format plus the duration), "json" or "off".
    access_log_format: str = "common"
    # Address of a reverse proxy whose forwarding headers are believed (waitress's trusted_proxy);
    # "*" trusts any peer: only when the port is reachable from the proxy alone.
    trusted_proxy: str | None = None
    trusted_proxy_headers: tuple[str, ...] = ("x-forwarded-for",)
    # Where entries live: None for the disk store at storage_dir, or "s3://BUCKET/PREFIX", a bucket
    # shared by any number of servers; storage_dir is then each server's local read tier.
    storage: str | None = None
    s3_endpoint: str | None = None  # None: AWS's endpoint of s3_region
    s3_region: str = "us-east-1"
    s3_addressing: str = "auto"  # path or virtual-host URLs; auto: virtual on AWS, paths elsewhere
    s3_ca_file: Path | None = None
    s3_multipart_threshold: int = 64 << 20
    s3_part_size: int = 16 << 20
    # Seconds a tier hit is served before the bucket is asked (one HEAD) whether it still holds it.
    s3_revalidate: float = 300.0
    # Start on a store that ignores If-None-Match (then the last writer wins across servers).
    s3_accept_last_writer_wins: bool = False
    # gc: remove entries created longer ago than this many seconds (the way to expire a bucket by hand).
    max_age: float | None = None

    @property
    def unpacked_limit(self) -> int:
        return self.max_unpacked_size if self.max_unpacked_size is not None else 64 * self.max_artifact_size


@dataclass(frozen=True)
class Option:
    name: str
    convert: Callable[[str], object]
    help: str
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    switch: bool = False  # a flag without a value on the command line (a yes/no in the environment)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("storage_dir", Path, "folder that holds the artifacts (default: ./cache)", metavar="DIR"),
    Option("bind", str, "address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)", metavar="ADDR"),
    Option("port", parse_port, "TCP port (default: 8080; 0 picks a free one)", metavar="PORT"),
    Option(
        "max_artifact_size",
        parse_size,
        "largest artifact accepted, in bytes or with a unit such as 512M (default: 1GiB)",
        aliases=("--max-size",),
        metavar="SIZE",
    ),
    Option(
        "max_unpacked_size",
        parse_size,
        "largest decompressed size of one artifact (default: 64 x --max-artifact-size)",
        metavar="SIZE",
    ),
    Option(
        "max_storage",
        parse_size,
        "total size of artifacts kept; the least recently used are evicted beyond it (default: no bound)",
        metavar="SIZE",
    ),
    Option("threads", parse_positive, "worker threads (default: 4)", metavar="N"),
    Option("workers", parse_workers,
           "worker processes serving one storage, each with --threads threads (default: 1; one per core to use them all)",
           metavar="N"),
    Option("max_connections", parse_positive,
           "open client connections; at the limit the one idle longest is closed (default: 200)", metavar="N"),
    Option("idle_timeout", parse_positive, "seconds before an idle connection is closed (default: 60)",
           metavar="SECONDS"),
    Option("log_level", parse_log_level, "debug, info, warning or error (default: info)", metavar="LEVEL"),
    Option(
        "token_file",
        Path,
        "file of access tokens, one 'role token' per line (roles: read, read-write); reread on SIGHUP."
        " POLYKIT_CACHE_TOKENS may hold the same lines instead",
        metavar="PATH",
    ),
    Option("allow_anonymous_read", parse_bool, "let requests without a token read (writes still need one)", switch=True),
    Option("access_log_format", parse_access_log_format, "one line per request: common, json or off (default: common)",
           metavar="FORMAT"),
    Option("trusted_proxy", str, "address of the reverse proxy whose X-Forwarded-* headers are believed", metavar="ADDR"),
    Option("trusted_proxy_headers", parse_proxy_headers,
           "forwarding headers taken from the trusted proxy (default: x-forwarded-for)", metavar="NAMES"),
    Option("storage", parse_storage_url,
           "s3://BUCKET/PREFIX to keep entries in an S3-compatible bucket shared by several servers, --storage-dir "
           "then being a local read tier (default: the disk store at --storage-dir)", metavar="URL"),
    Option("s3_endpoint", str, "URL of the S3-compatible store (default: AWS's endpoint of --s3-region)", metavar="URL"),
    Option("s3_region", str, "region of the bucket (default: us-east-1)", metavar="REGION"),
    Option("s3_addressing", parse_addressing,
           "bucket URLs: path, virtual (host) or auto (virtual on AWS, path elsewhere; the default)", metavar="STYLE"),
    Option("s3_ca_file", Path, "CA certificates to trust for an https endpoint (default: the system's)", metavar="PATH"),
    Option("s3_multipart_threshold", parse_size, "uploads this large go in parts (default: 64M)", metavar="SIZE"),
    Option("s3_part_size", parse_size, "size of each part of a multipart upload, at least 5M (default: 16M)",
           metavar="SIZE"),
    Option("s3_revalidate", parse_duration,
           "a local copy older than this is confirmed with the bucket before it is served (default: 300 seconds)",
           metavar="SECONDS"),
    Option("s3_accept_last_writer_wins", parse_bool,
           "start even on a store that ignores If-None-Match (then the last of racing writers wins)", switch=True),
    Option("max_age", parse_duration, "gc: remove entries created longer ago than this (30d, 12h, seconds)",
           metavar="AGE"),
)


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Declare the options (all, or those named) on a parser; defaults stay unset so the environment can fill them."""
    for opt in OPTIONS:
        if names is not None and opt.name not in names:
            continue
        if opt.switch:
            parser.add_argument(opt.flag, *opt.aliases, dest=opt.name, action="store_const", const="1", default=None,
                                help=f"{opt.help} [env: {opt.env}=1]")
            continue
        parser.add_argument(
            opt.flag,
            *opt.aliases,
            dest=opt.name,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} [env: {opt.env}]",
        )


def from_sources(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the configuration: command line, then environment, then the defaults above."""
    values: dict[str, object] = {}
    for opt in OPTIONS:
        if not hasattr(args, opt.name):
            continue  # an option this command does not take
        raw = getattr(args, opt.name)
        source = opt.flag
        if raw is None and environ.get(opt.env, "") != "":
            raw, source = environ[opt.env], opt.env
        if raw is None:
            continue
        try:
            values[opt.name] = opt.convert(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    return Config(**values)


def describe(config: Config) -> str:
    """The effective settings as one log line (nothing secret is held here)."""
    parts = [f"{f.name}={getattr(config, f.name)}" for f in fields(config)]
    parts.append(f"unpacked_limit={config.unpacked_limit}")
    return " ".join(parts)


def setup_logging(level: str, access_log_format: str = "common") -> None:
    """Server messages with time and level; access lines as they are, so tools can parse them.

    waitress warns "Task queue depth is N" whenever a request waits for a worker thread, which
    under any load is nearly every request: a log line each, written by the thread that should
    be serving. Requests waiting is normal (connections are bounded, see ``--max-connections``),
    so that warning shows at ``--log-level debug`` only, and there at most once per
    ``server.QUEUE_LOG_SECONDS`` (see ``server.QueueDepthLog``).
    """
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    access = logging.getLogger("polykit_cache.access")
    access.propagate = False
    access.handlers[:] = []
    if access_log_format == "off" or getattr(logging, level) > logging.INFO:
        access.setLevel(logging.WARNING)
        return
    access.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Parse ``serve`` options alone (used by tests and the benchmark)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_sources(parser.parse_args(list(argv)), os.environ if environ is None else environ)
