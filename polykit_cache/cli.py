"""The ``polykit-cache`` command: ``serve`` (the default), ``verify``, ``gc`` and ``stats``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from polykit_client import __version__, zstd

from . import config as cfg
from .app import make_app
from .auth import Access, TokenError
from .flusher import Flusher
from .history import History
from .metrics import Metrics
from .s3store import S3Store, StoreMisconfigured
from .server import Server, bind
from .sharedstate import SharedState
from .storage import Storage, StorageBusy
from .stores import open_store
from .store import Store
from .supervisor import Supervisor

log = logging.getLogger("polykit_cache")

DESCRIPTION = """\
Self-hosted build cache server. `polykit-cache` alone serves ./cache on 127.0.0.1:8080.
Every option can also be given as an environment variable POLYKIT_CACHE_<NAME>.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polykit-cache",
        description=DESCRIPTION,
        epilog="`polykit-cache serve --help` lists the server's options.",
    )
    parser.add_argument("--version", action="version", version=f"polykit-cache {__version__} ({zstd.backend_name()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve the cache over HTTP (the default command)")
    cfg.add_arguments(serve)
    verify = sub.add_parser("verify", help="rehash every stored artifact; quarantine corrupt ones (exit 1 if any)")
    store_options = ["storage_dir", "storage", "s3_endpoint", "s3_region", "s3_addressing", "s3_ca_file", "log_level"]
    cfg.add_arguments(verify, store_options)
    gc = sub.add_parser("gc", help="evict least recently used artifacts until the storage is under --max-storage, "
                                   "or remove entries older than --max-age (the way on a bucket)")
    cfg.add_arguments(gc, store_options + ["max_storage", "max_age"])
    stats = sub.add_parser("stats", help="print what the storage holds")
    cfg.add_arguments(stats, store_options)
    stats.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version"):
        args_list.insert(0, "serve")
    parser = build_parser()
    if args_list in (["-h"], ["--help"]):
        # `polykit-cache` alone serves, so its help shows the server's options too.
        print(parser.format_help())
        parser.parse_args(["serve", "--help"])
    args = parser.parse_args(args_list)
    try:
        config = cfg.from_sources(args, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    cfg.setup_logging(config.log_level, config.access_log_format)
    if args.command in ("verify", "gc", "stats"):
        from . import maintenance

        if args.command == "gc" and config.max_storage is None and config.max_age is None:
            parser.error("gc needs --max-storage (or POLYKIT_CACHE_MAX_STORAGE), or --max-age")
        if args.command == "gc" and config.storage is not None and config.max_age is None:
            parser.error("gc on a bucket removes by age: give --max-age (live servers share the bucket)")
        with tempfile.TemporaryDirectory(prefix="polykit-cache-tier-") as scratch:
            # Only gc evicts: verify and stats may run beside a live server, so they never get a
            # bound (one could come from POLYKIT_CACHE_MAX_STORAGE in a shared environment). On a
            # bucket they read through a scratch tier, never a live server's.
            try:
                store = open_store(config, config.max_storage if args.command == "gc" else None,
                                   tier_dir=Path(scratch) if config.storage else None)
            except StoreMisconfigured as exc:
                log.error("%s", exc)
                return 2
            try:
                if args.command == "verify":
                    return maintenance.verify_storage(store)
                if args.command == "gc":
                    try:
                        return maintenance.collect(store, config.max_age)
                    except StorageBusy:
                        log.error("a polykit-cache server is serving %s; gc evicts only beside a stopped server "
                                  "(a running one with --max-storage evicts by itself)", store.describe())
                        return 1
                return maintenance.show_stats(store, args.json)
            finally:
                store.close()
    return serve(config)


def serve(config: cfg.Config) -> int:
    """Recover the storage, then serve until SIGTERM or SIGINT."""
    try:
        storage = open_store(config, config.max_storage)
        (storage.tier if isinstance(storage, S3Store) else storage).lock()
        storage.recover()
        if isinstance(storage, S3Store):
            storage.check(config.s3_accept_last_writer_wins)
    except StoreMisconfigured as exc:
        log.error("cannot use %s: %s", config.storage, exc)
        return 2
    except StorageBusy as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot use storage folder %s: %s", config.storage_dir, exc)
        return 1
    try:
        access = Access(config.token_file, os.environ, config.allow_anonymous_read)
    except TokenError as exc:
        log.error("%s", exc)
        return 2
    if config.workers > 1:
        return serve_workers(config, storage, access)
    app = make_app(config, storage, access=access)
    try:
        server = Server(app, config)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.bind, config.port, exc)
        return 1
    count, size, _ = storage.usage()
    log.info("polykit-cache %s (%s): %s", __version__, zstd.backend_name(), cfg.describe(config))
    log.info("storage %s holds %d artifacts, %d bytes", storage.describe(), count, size)
    (log.warning if access.open else log.info)("%s", access.describe())
    log.info("serving on http://%s:%d", server.host, server.port)
    try:
        server.run(on_hangup=access.reload)
    finally:
        app.metrics.history.close()  # the last seconds of figures
    return 0


def serve_workers(config: cfg.Config, storage: Store, access: Access) -> int:
    """Bind once, then serve from ``config.workers`` forked processes sharing the storage and the counters.

    The disk folder (the disk store, or the S3 store's local tier) is shared through its index
    in the shared database; the bucket needs nothing more, as several servers may share one.
    """
    try:
        sockets = bind(config)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.bind, config.port, exc)
        return 1
    disk: Storage = storage.tier if isinstance(storage, S3Store) else storage  # type: ignore[assignment]
    shared = SharedState.create(disk.root)
    shared.close()  # each worker opens its own connections after the fork
    disk.publish_index(shared.path)
    storage.close()  # no pooled connection to a bucket is inherited: each worker opens its own
    count, size, _ = storage.usage()
    log.info("polykit-cache %s (%s): %s", __version__, zstd.backend_name(), cfg.describe(config))
    log.info("storage %s holds %d artifacts, %d bytes", storage.describe(), count, size)
    (log.warning if access.open else log.info)("%s", access.describe())
    host, port = sockets[0].getsockname()[:2]
    log.info("serving on http://%s:%d with %d worker processes", host, port, config.workers)

    def work(slot: int) -> int:
        disk.share(shared.path)
        # The tokens read at start-up, reread now: a worker started after the file was broken
        # (or a reload asked for while it started) keeps serving with the tokens in force.
        worker_access = access
        worker_access.reload()
        # Each worker adds to the one history file through its own connection (flushes add up).
        state = SharedState(shared.path)
        state.join(slot)
        metrics = Metrics(storage.usage, History.open(config.storage_dir), config.max_storage, state)
        app = make_app(config, storage, metrics=metrics, access=worker_access)
        server = Server(app, config, sockets=sockets)
        # Counts and uses go to the shared database in batches (see flusher.py), the last at exit.
        flusher = Flusher([metrics.flush, disk.flush_uses])
        flusher.start()
        log.info("worker %d (pid %d) serving", slot, os.getpid())
        try:
            server.run(on_hangup=worker_access.reload)
        finally:
            flusher.stop()
            state.leave()
            metrics.history.close()  # the worker's last seconds of figures
        return 0

    return Supervisor(config.workers, work).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
