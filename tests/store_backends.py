"""Stores for the contract suite that need a server: S3 on a real moto server process."""

from __future__ import annotations

import itertools

from s3support import Moto, s3_store


def s3_store_factory(request, tmp_path):
    """A function making S3 stores, each with its own tier, on one bucket of a moto server."""
    moto = Moto(tmp_path / "moto.log")
    request.addfinalizer(moto.stop)
    bucket = moto.make_bucket()
    counter = itertools.count()
    return lambda: s3_store(moto, bucket, tmp_path / f"tier-{next(counter)}")
