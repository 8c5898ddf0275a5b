"""A store in an S3-compatible bucket, shared by any number of servers, behind a local read tier.

**The bucket is the shared state.** One object per entry, at ``<prefix><space>/<name>``, with its
SHA-256, creation time and the protocol's fields (turbo's duration and tag) as object metadata.
No server keeps a new upload in its tier alone: an upload is answered ``201`` only after the
bucket's ``200``.

**First write wins across servers.** Every write to an immutable space is conditional: a ``PUT``
with ``If-None-Match: *``, or a multipart upload whose ``CompleteMultipartUpload`` carries it
(RFC 9110 13.1.2; S3 "conditional writes"). A ``412`` means another server won: the commit
answers "already stored" and the client gets ``409``. A ``200`` to ``CompleteMultipartUpload``
may still carry an error in its body (S3 documents this), so the body is checked.

**Reads go through the tier** (``--storage-dir``, bounded by ``--max-storage``, least recently
used first): a miss downloads into the tier while hashing and serves the object only if its
bytes match the SHA-256 in its metadata. A hit older than the revalidation interval is confirmed
with one ``HEAD``: if the bucket lost the object it is uploaded again from the verified local
copy; if the bucket holds other bytes (Bazel's action cache was replaced), the tier's copy is
dropped. When the bucket cannot be reached, misses and uploads raise StorageUnavailable (503,
the client builds) and tier hits are still served.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from typing import BinaryIO, Iterator, Mapping

from .s3client import Body, S3Client, S3Error, Unreachable
from .storage import Storage
from .store import (REPLACEABLE, RESERVED_META, SPACES, Staged, Stat, Store, StorageFull, StorageUnavailable,
                    Usage, check_space)

log = logging.getLogger("polykit_cache.s3")

MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts but the last
REVALIDATE = 300.0
MAX_CONFLICT_RETRIES = 3  # S3 answers 409 to a conditional write racing another one in flight
META_SHA, META_CREATED, META_FIELDS = "x-amz-meta-sha256", "x-amz-meta-created", "x-amz-meta-fields"


class StoreMisconfigured(Exception):
    """The bucket cannot be used as configured; the message is one sentence for the operator."""


def _xml_text(body: bytes, tag: str) -> str | None:
    """The first element named ``tag`` (in any namespace) of an XML answer."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == tag:
            return element.text
    return None


class S3Store(Store):
    """Thread-safe; one per server process, any number of processes per bucket."""

    def __init__(self, client: S3Client, prefix: str, tier: Storage, *, multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE, revalidate: float = REVALIDATE, conditional: bool = True) -> None:
        self.client = client
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.tier = tier
        self.multipart_threshold = max(multipart_threshold, MIN_PART_SIZE)
        self.part_size = max(part_size, MIN_PART_SIZE)
        self.revalidate = revalidate
        self.conditional = conditional
        self._confirmed: dict[tuple[str, str], float] = {}  # when each tier entry was last seen in the bucket
        self._lock = threading.Lock()
        self._bucket_usage: Usage | None = None

    def _key(self, space: str, name: str) -> str:
        return f"{self.prefix}{space}/{name}"

    # --- metadata ------------------------------------------------------------------------------

    def _stat_of(self, space: str, name: str, headers: Mapping[str, str]) -> Stat:
        fields: dict = {}
        try:
            loaded = json.loads(headers.get(META_FIELDS) or "{}")
            fields = {k: v for k, v in loaded.items() if k not in RESERVED_META} if isinstance(loaded, dict) else {}
        except ValueError:
            pass
        try:
            created = float(headers.get(META_CREATED) or 0)
        except ValueError:
            created = 0.0
        return Stat(space, name, int(headers.get("content-length") or 0), headers.get(META_SHA), created, fields)

    def _head(self, space: str, name: str) -> Stat | None:
        try:
            answer = self.client.request("HEAD", self._key(space, name))
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise StorageUnavailable(f"the bucket refused a HEAD: {exc}") from None
        return self._stat_of(space, name, answer.headers)

    def _mark(self, space: str, name: str) -> None:
        with self._lock:
            self._confirmed[(space, name)] = time.monotonic()

    def _forget(self, space: str, name: str) -> None:
        with self._lock:
            self._confirmed.pop((space, name), None)

    # --- reads ---------------------------------------------------------------------------------

    def _confirm(self, local: Stat) -> Stat | None:
        """The tier's entry if the bucket still holds the same bytes (asked once per interval), else None."""
        space, name = local.space, local.name
        with self._lock:
            seen = self._confirmed.get((space, name))
        if seen is not None and time.monotonic() - seen < self.revalidate:
            return local
        try:
            remote = self._head(space, name)
        except StorageUnavailable:
            return local  # the bucket is down: a verified tier copy is still served
        if remote is None:
            return local if self._heal(local) else None
        if remote.sha256 != local.sha256:
            self.tier.delete(space, name)  # replaced in the bucket (Bazel's action cache), or lost and re-uploaded
            self._forget(space, name)
            return None
        self._mark(space, name)
        return local

    def _heal(self, local: Stat) -> bool:
        """Upload a tier entry the bucket lost again (after checking its bytes); whether the bucket now has it."""
        space, name = local.space, local.name
        opened = self.tier.open(space, name, use=False)
        if opened is None:
            return False
        _, fh = opened
        with fh:
            digest = hashlib.sha256()
            while block := fh.read(1 << 20):
                digest.update(block)
            if digest.hexdigest() != local.sha256:
                log.error("the local copy of %s/%s fails its SHA-256; dropped", space, name)
                self.tier.delete(space, name)
                return False
            try:
                stored = self._upload(space, name, fh, local.size, local.sha256, local.created, dict(local.meta))
            except StorageUnavailable:
                return True  # keep serving the verified copy; the next revalidation tries again
        if stored:
            log.warning("%s/%s was missing from the bucket; uploaded again from this server's copy", space, name)
            self._mark(space, name)
            return True
        self.tier.delete(space, name)  # another server uploaded other bytes meanwhile: theirs win
        self._forget(space, name)
        return False

    def stat(self, space: str, name: str, use: bool = False) -> Stat | None:
        check_space(space)
        local = self.tier.stat(space, name, use=use)
        if local is not None:
            confirmed = self._confirm(local)
            if confirmed is not None:
                return confirmed
        return self._head(space, name)

    def open(self, space: str, name: str, use: bool = True) -> tuple[Stat, BinaryIO] | None:
        check_space(space)
        local = self.tier.stat(space, name)
        if local is not None and self._confirm(local) is not None:
            opened = self.tier.open(space, name, use=use)
            if opened is not None:
                return opened
        if not self._fetch(space, name):
            return None
        return self.tier.open(space, name, use=use)

    def _fetch(self, space: str, name: str) -> bool:
        """Download an object into the tier, hashing it; False when it is missing or fails its SHA-256."""
        try:
            answer = self.client.request("GET", self._key(space, name), stream=True)
        except S3Error as exc:
            if exc.status == 404:
                return False
            raise StorageUnavailable(f"the bucket refused a GET: {exc}") from None
        remote = self._stat_of(space, name, answer.headers)
        complete = False
        try:
            staged = self.tier.stage()
        except StorageFull:
            answer.close(reusable=False)
            raise StorageUnavailable("the local tier is full") from None
        try:
            # Never more than the announced length: a store that keeps sending cannot fill the tier.
            while staged.size <= remote.size and (block := answer.read(min(1 << 20, remote.size - staged.size + 1))):
                staged.write(block)
            complete = staged.size <= remote.size
        except StorageFull:
            staged.discard()
            raise StorageUnavailable("the local tier is full") from None
        except (OSError, http.client.HTTPException) as exc:
            staged.discard()
            raise Unreachable(f"the download of {space}/{name} broke off: {exc!r}") from None
        except BaseException:
            staged.discard()
            raise
        finally:
            answer.close(reusable=complete)
        if staged.size != remote.size or staged.sha256 != remote.sha256:
            staged.discard()
            # Never served: the client builds instead. verify takes such an object away.
            log.error("%s/%s in the bucket fails its recorded size or SHA-256; not served", space, name)
            return False
        staged.finish()
        if space in REPLACEABLE:
            self.tier.delete(space, name)
        self.tier.commit(space, name, staged, dict(remote.meta))
        self._mark(space, name)
        return True

    # --- writes --------------------------------------------------------------------------------

    def stage(self) -> Staged:
        return self.tier.stage()

    def commit(self, space: str, name: str, staged: Staged, meta: Mapping[str, object] | None = None) -> bool:
        check_space(space)
        fields = dict(meta or {})
        if RESERVED_META & set(fields):
            staged.discard()
            raise ValueError(f"metadata may not use {sorted(RESERVED_META & set(fields))}")
        try:
            stored = self._upload(space, name, staged.reader(), staged.size, staged.sha256, time.time(), fields)
        except BaseException:
            staged.discard()
            raise
        if not stored:
            staged.discard()
            return False
        # The bucket has it; the tier keeps a copy for reads (a stale one of a name the bucket had lost goes first).
        self.tier.delete(space, name)
        try:
            self.tier.commit(space, name, staged, fields)
        except StorageFull:
            staged.discard()
        self._mark(space, name)
        return True

    def _upload(self, space: str, name: str, fh: BinaryIO, size: int, sha256: str, created: float,
                fields: dict) -> bool:
        """One conditional write of a file's bytes; False when another writer was first (412)."""
        headers = {"content-type": "application/octet-stream", META_SHA: sha256, META_CREATED: repr(created),
                   META_FIELDS: json.dumps(fields, separators=(",", ":"))}
        conditional = self.conditional and space not in REPLACEABLE
        key = self._key(space, name)
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            try:
                if size >= self.multipart_threshold:
                    self._multipart(key, fh, size, headers, conditional)
                else:
                    self.client.request("PUT", key, headers={**headers, **({"if-none-match": "*"} if conditional else {})},
                                        body=Body(fh, 0, size), payload_hash=sha256)
                return True
            except S3Error as exc:
                if exc.status == 412 or exc.code == "PreconditionFailed":
                    return False
                if exc.status == 409 and attempt < MAX_CONFLICT_RETRIES:
                    time.sleep(0.05 * (attempt + 1))  # a racing conditional write was in flight
                    continue
                raise StorageUnavailable(f"the bucket refused the upload of {space}/{name}: {exc}") from None
        raise StorageUnavailable(f"the upload of {space}/{name} kept conflicting with others")

    def _multipart(self, key: str, fh: BinaryIO, size: int, headers: dict, conditional: bool) -> None:
        """A multipart upload, completed conditionally; aborted on any failure, so no part lingers."""
        started = self.client.request("POST", key, params=[("uploads", "")], headers=headers)
        upload_id = _xml_text(started.body, "UploadId")
        if not upload_id:
            raise S3Error(started.status, "NoUploadId", "CreateMultipartUpload answered no UploadId")
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                length = min(self.part_size, size - offset)
                digest = hashlib.sha256()
                fh.seek(offset)
                left = length
                while left:
                    block = fh.read(min(1 << 20, left))
                    if not block:
                        raise OSError("the staged upload is shorter than its size")
                    digest.update(block)
                    left -= len(block)
                answer = self.client.request("PUT", key, params=[("partNumber", str(number)), ("uploadId", upload_id)],
                                             body=Body(fh, offset, length), payload_hash=digest.hexdigest())
                parts.append((number, answer.headers.get("etag", "")))
            body = ("<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in parts)
                + "</CompleteMultipartUpload>").encode()
            answer = self.client.request("POST", key, params=[("uploadId", upload_id)], body=body,
                                         headers={"if-none-match": "*"} if conditional else {})
            code = _xml_text(answer.body, "Code")
            if code is not None:  # S3 may answer 200 and report the failure in the body
                status = 412 if code == "PreconditionFailed" else 409 if code == "ConditionalRequestConflict" else 500
                raise S3Error(status, code, _xml_text(answer.body, "Message") or "")
        except BaseException:
            try:
                self.client.request("DELETE", key, params=[("uploadId", upload_id)])
            except (S3Error, StorageUnavailable):
                log.warning("could not abort multipart upload %s of %s (a lifecycle rule removes it)", upload_id, key)
            raise

    def delete(self, space: str, name: str) -> bool:
        check_space(space)
        existed = self._head(space, name) is not None
        try:
            self.client.request("DELETE", self._key(space, name))
        except S3Error as exc:
            if exc.status != 404:
                raise StorageUnavailable(f"the bucket refused a DELETE: {exc}") from None
        self._forget(space, name)
        return self.tier.delete(space, name) or existed

    # --- listing -------------------------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under a prefix, page by page (ListObjectsV2)."""
        token = None
        while True:
            params = [("list-type", "2"), ("prefix", prefix)] + ([("continuation-token", token)] if token else [])
            try:
                answer = self.client.request("GET", "", params=params)
            except S3Error as exc:
                raise StorageUnavailable(f"the bucket refused a listing: {exc}") from None
            root = ET.fromstring(answer.body)
            for element in root:
                if element.tag.rsplit("}", 1)[-1] != "Contents":
                    continue
                values = {child.tag.rsplit("}", 1)[-1]: child.text for child in element}
                yield values.get("Key") or "", int(values.get("Size") or 0)
            token = _xml_text(answer.body, "NextContinuationToken")
            if (_xml_text(answer.body, "IsTruncated") or "false") != "true" or not token:
                return

    def scan(self, space: str, prefix: str = "") -> Iterator[Stat]:
        check_space(space)
        base = self._key(space, "")
        for key, _ in self._list(base + prefix):
            found = self._head(space, key[len(base):])  # the listing carries no metadata
            if found is not None:
                yield found

    def usage(self) -> Usage:
        """The bucket's figures once :meth:`refresh` counted them; until then the local tier's."""
        return self._bucket_usage or self.tier.usage()

    def refresh(self) -> None:
        count = total = 0
        for space in SPACES:
            for _, size in self._list(self._key(space, "")):
                count += 1
                total += size
        self._bucket_usage = Usage(count, total, 0)

    def use_range(self) -> tuple[float, float] | None:
        return self.tier.use_range()

    def recover(self) -> None:
        self.tier.recover()

    def quarantine(self, space: str, name: str) -> None:
        """An object that failed verification is removed from the bucket (and the tier)."""
        self.delete(space, name)

    def describe(self) -> str:
        return f"s3://{self.client.endpoint.bucket}/{self.prefix} at {self.client.endpoint.url} (tier {self.tier.root})"

    def close(self) -> None:
        self.client.close()

    # --- start-up ------------------------------------------------------------------------------

    def check(self, accept_last_writer_wins: bool = False) -> None:
        """Refuse to start, with one sentence, on a bucket that cannot be used; then probe conditional writes."""
        bucket, url = self.client.endpoint.bucket, self.client.endpoint.url
        try:
            self.client.request("GET", "", params=[("list-type", "2"), ("max-keys", "1"), ("prefix", self.prefix)])
        except Unreachable as exc:
            raise StoreMisconfigured(f"cannot reach the S3 endpoint {url}: {exc}") from None
        except S3Error as exc:
            raise StoreMisconfigured(_explain(exc, bucket, self.client.endpoint.region)) from None
        key = f"{self.prefix}.polykit-probe/{uuid.uuid4().hex}"
        try:
            self.client.request("PUT", key, headers={"if-none-match": "*"}, body=b"probe")
            try:
                self.client.request("PUT", key, headers={"if-none-match": "*"}, body=b"probe")
                honoured = False
            except S3Error as exc:
                if exc.status not in (409, 412):
                    raise
                honoured = True
            self.client.request("DELETE", key)
        except S3Error as exc:
            raise StoreMisconfigured(f"cannot write to bucket {bucket!r}: {_explain(exc, bucket, self.client.endpoint.region)}") from None
        except Unreachable as exc:
            raise StoreMisconfigured(f"cannot reach the S3 endpoint {url}: {exc}") from None
        if not honoured:
            if not accept_last_writer_wins:
                raise StoreMisconfigured(
                    f"the store at {url} ignores If-None-Match, so two servers could both store an entry; "
                    "use a store that honours conditional writes, or pass --s3-accept-last-writer-wins")
            self.conditional = False
            log.warning("the store ignores conditional writes: the last writer wins (accepted by the flag)")


def _explain(exc: S3Error, bucket: str, region: str) -> str:
    """One sentence for an S3 error met at start-up."""
    code = exc.code
    if code == "NoSuchBucket" or (exc.status == 404 and code.startswith("HTTP")):
        return f"the bucket {bucket!r} does not exist"
    if code == "InvalidAccessKeyId":
        return "the access key is not known to the store (check AWS_ACCESS_KEY_ID or the profile)"
    if code == "SignatureDoesNotMatch":
        return "the secret access key is wrong (the store refused the request signature)"
    if code in ("RequestTimeTooSkewed", "RequestExpired"):
        return "this machine's clock differs too much from the store's; fix the clock (NTP)"
    if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException") or exc.status == 301:
        return f"the bucket {bucket!r} is not in region {region!r} (set --s3-region)"
    if code == "AccessDenied":
        return f"access to bucket {bucket!r} is denied (see the IAM policy in the deployment docs)"
    return f"the store refused the request: {exc}"
