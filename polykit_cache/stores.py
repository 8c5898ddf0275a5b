"""Opening the store the configuration names: the disk folder, or a bucket behind a local tier."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .config import Config
from .s3client import CredentialsMissing, Endpoint, S3Client, load_credentials
from .s3store import S3Store, StoreMisconfigured
from .storage import Storage
from .store import Store


def open_store(config: Config, max_storage: int | None, tier_dir: Path | None = None,
               environ: Mapping[str, str] | None = None) -> Store:
    """The configured store, not yet recovered; an S3 store's tier is ``tier_dir`` or ``--storage-dir``.

    Raises StoreMisconfigured with one sentence when the S3 settings cannot work (no credentials,
    a bad endpoint URL); the bucket itself is checked by :meth:`S3Store.check`.
    """
    if config.storage is None:
        return Storage(config.storage_dir, max_storage)
    bucket, _, prefix = config.storage[len("s3://"):].partition("/")
    try:
        credentials = load_credentials(os.environ if environ is None else environ)
        endpoint = Endpoint.make(config.s3_endpoint, config.s3_region, bucket, config.s3_addressing,
                                 str(config.s3_ca_file) if config.s3_ca_file else None)
        client = S3Client(endpoint, credentials)
    except (CredentialsMissing, ValueError, OSError) as exc:
        raise StoreMisconfigured(str(exc)) from None
    tier = Storage(tier_dir or config.storage_dir, max_storage)
    return S3Store(client, prefix, tier, multipart_threshold=config.s3_multipart_threshold,
                   part_size=config.s3_part_size, revalidate=config.s3_revalidate)
