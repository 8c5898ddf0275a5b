"""The ``polykit-cache`` command: ``serve`` (the default) and ``verify``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from polykit_client import __version__, zstd

from . import config as cfg
from .app import make_app
from .auth import Access, TokenError
from .server import Server
from .storage import Storage

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
    verify = sub.add_parser("verify", help="rehash every stored artifact; quarantine corrupt ones")
    verify.add_argument("--storage-dir", dest="storage_dir", default=None, metavar="DIR",
                        help=f"storage folder to check (default: ./cache) [env: {cfg.ENV_PREFIX}STORAGE_DIR]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version"):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "verify":
            config = cfg.from_sources(argparse.Namespace(storage_dir=args.storage_dir), os.environ)
        else:
            config = cfg.from_sources(args, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    cfg.setup_logging(config.log_level)
    if args.command == "verify":
        from .maintenance import verify_storage

        return verify_storage(Storage(config.storage_dir))
    return serve(config)


def serve(config: cfg.Config) -> int:
    """Recover the storage, then serve until SIGTERM or SIGINT."""
    try:
        storage = Storage(config.storage_dir)
        storage.recover()
    except OSError as exc:
        log.error("cannot use storage folder %s: %s", config.storage_dir, exc)
        return 1
    try:
        access = Access(config.token_file, os.environ, config.allow_anonymous_read)
    except TokenError as exc:
        log.error("%s", exc)
        return 2
    app = make_app(config, storage, access=access)
    try:
        server = Server(app, config)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.bind, config.port, exc)
        return 1
    count, size = storage.totals()
    log.info("polykit-cache %s (%s): %s", __version__, zstd.backend_name(), cfg.describe(config))
    log.info("storage %s holds %d artifacts, %d bytes", storage.root, count, size)
    (log.warning if access.open else log.info)("%s", access.describe())
    log.info("serving on http://%s:%d", server.host, server.port)
    server.run(on_hangup=access.reload)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
