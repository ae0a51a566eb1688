"""What every object store's connector does the same way (S3 and Azure Blob Storage, through
obstore): a lazy, paginated listing in key order, an ETag (or version id) as each object's
version, reads retried by obstore, and every failure one line naming the store, never a
secret. A store's own module gives its client and its error codes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import timedelta
from functools import lru_cache
from typing import Any

import obstore
import pyarrow as pa
import pyarrow.compute as pc
from obstore.exceptions import BaseError, NotFoundError

from connectors.base import LISTING_SCHEMA, glob_regex, key_selected
from connectors.blob import SPOOL_CHUNK, Blob
from pipeline.errors import ConnectorError, SourceUnavailable, TransientConnectorError
from pipeline.records import Reject, SourceObject


def client_settings(allow_http: bool, timeout_s: float,
                    max_retries: int) -> dict[str, Any]:
    """obstore's client and retry options for a store: timeouts, and retries with backoff."""
    return {"client_options": {"allow_http": allow_http, "timeout": timedelta(seconds=timeout_s),
                               "connect_timeout": timedelta(seconds=min(timeout_s, 10))},
            "retry_config": {"max_retries": max_retries,
                             "backoff": {"init_backoff": timedelta(milliseconds=200),
                                         "max_backoff": timedelta(seconds=10), "base": 2},
                             "retry_timeout": timedelta(seconds=timeout_s * 2)}}


class ObjectConnector:
    """A connector over ``store`` (an obstore store scoped to one bucket or container): the
    objects under ``prefix`` whose keys the include and exclude globs keep, as
    ``{scheme}://{bucket}/{key}`` uris."""

    scheme = ""
    hints: Mapping[str, str] = {}  # the store's error codes, and what they mean
    source_codes: frozenset[str] = frozenset()  # those about the store, never one object
    transient: frozenset[str] = frozenset()
    reads_wait = True  # each read is a request to the store

    def __init__(self, store: Any, bucket: str, prefix: str, include: list[str],
                 exclude: list[str], endpoint: str, secrets: list[str]) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix
        self.include, self.exclude = include, exclude
        self.endpoint = endpoint
        self._secrets = secrets

    def error_code(self, text: str) -> str | None:
        raise NotImplementedError

    def _error(self, doing: str, exc: BaseException, key: str | None = None) -> ConnectorError:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        code = self.error_code(text)
        where = f"{self.scheme}://{self.bucket}/{self.prefix}{key or ''} at {self.endpoint}"
        if code is not None and code in self.hints:
            failed = SourceUnavailable if code in self.source_codes else ConnectorError
            return failed(f"{doing} {where}: {self.hints[code]}")
        if code in self.transient or "connect" in text.lower() or "timed out" in text.lower():
            return TransientConnectorError(f"{doing} {where}: the endpoint cannot be reached or "
                                           f"is failing ({code or type(exc).__name__})")
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        return ConnectorError(f"{doing} {where}: {code or first}")

    def _object(self, meta: Any) -> SourceObject:
        path = str(meta["path"])
        return SourceObject(uri=f"{self.scheme}://{self.bucket}/{path}",
                            key=path[len(self.prefix):], size=int(meta["size"]),
                            mtime=meta["last_modified"], version=_version(meta))

    def list(self) -> Iterator[SourceObject | Reject]:
        try:
            for page in obstore.list(self.store, prefix=self.prefix or None, chunk_size=1000):
                for meta in page:
                    key = str(meta["path"])[len(self.prefix):]
                    if key and not key.endswith("/") and key_selected(key, self.include,
                                                                      self.exclude):
                        yield self._object(meta)
        except BaseError as exc:
            raise self._error("cannot list", exc) from None

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        """The listing built column by column: obstore's pages as Arrow, the keys selected
        and the uris and versions made with Arrow's compute kernels (no Python object per
        key)."""
        try:
            for page in obstore.list(self.store, prefix=self.prefix or None, chunk_size=1000,
                                     return_arrow=True):
                batch = self._listing(pa.record_batch(page))
                if batch.num_rows:
                    yield batch
        except BaseError as exc:
            raise self._error("cannot list", exc) from None

    def _listing(self, page: pa.RecordBatch) -> pa.RecordBatch:
        path = page.column("path")
        key = pc.utf8_slice_codeunits(path, len(self.prefix))
        keep = pc.and_(pc.greater(pc.utf8_length(key), 0),
                       pc.invert(pc.ends_with(key, "/")))
        keep = pc.and_(keep, self._selected(key))
        page, key = page.filter(keep), key.filter(keep)
        etag = pc.replace_substring(page.column("e_tag"), '"', "")
        version = pc.coalesce(page.column("version"),
                              pc.if_else(pc.greater(pc.utf8_length(etag), 0), etag, None))
        n = page.num_rows
        return pa.RecordBatch.from_arrays([
            pc.binary_join_element_wise(f"{self.scheme}://{self.bucket}/", page.column("path"),
                                        ""),
            key,
            pc.binary_join_element_wise("etag:", version, ""),
            pc.cast(page.column("size"), pa.int64()),
            pc.cast(page.column("last_modified"), pa.timestamp("us", tz="UTC")),
            pa.nulls(n, pa.string()), pa.nulls(n, pa.string()),
        ], schema=LISTING_SCHEMA)

    def _selected(self, keys: pa.Array) -> pa.Array:
        """Which keys the include and exclude globs keep."""
        if self.include == ["**/*"] and not self.exclude:
            return pa.array([True] * len(keys))
        try:
            def any_of(patterns: list[str]) -> pa.Array:
                found = pa.array([False] * len(keys))
                for pattern in patterns:  # Python's regex syntax, as RE2 takes it
                    body = glob_regex(pattern).pattern.removesuffix("\\Z")
                    found = pc.or_(found, pc.match_substring_regex(keys, f"^(?:{body})$"))
                return found

            return pc.and_(any_of(self.include), pc.invert(any_of(self.exclude)))
        except pa.ArrowInvalid:  # a pattern RE2 does not take: one key at a time
            return pa.array([key_selected(k, self.include, self.exclude)
                             for k in keys.to_pylist()])

    def read(self, obj: SourceObject) -> bytes:
        with self.fetch(obj) as blob:
            return blob.read()

    def fetch(self, obj: SourceObject) -> Blob:
        """The object, fetched once: a large one streamed to a temporary file, never held in
        memory whole."""
        try:
            got = obstore.get(self.store, self.prefix + obj.key)
            if not Blob.large(got.meta["size"]):
                return Blob.of(bytes(got.bytes()))
            return Blob.spool(got.stream(min_chunk_size=SPOOL_CHUNK), got.meta["size"])
        except NotFoundError:
            raise ConnectorError(f"{obj.key}: gone from {self.scheme}://{self.bucket} before it "
                                 "could be read", uri=obj.uri) from None
        except BaseError as exc:
            raise self._error("cannot read", exc, obj.key) from None

    def ranged(self, obj: SourceObject) -> Blob:
        """The object read by range as its readers ask (``plan``); a read that finds another
        version than the listing found fails, as a vanished object does."""
        path = self.prefix + obj.key

        def fetch(start: int, end: int) -> bytes:
            try:
                got = obstore.get(self.store, path, options={"range": (start, end)})
                data = bytes(got.bytes())
            except NotFoundError:
                raise ConnectorError(f"{obj.key}: gone from {self.scheme}://{self.bucket} "
                                     "before it could be read", uri=obj.uri) from None
            except BaseError as exc:
                raise self._error("cannot read", exc, obj.key) from None
            if obj.version not in (None, _version(got.meta)):
                raise ConnectorError(f"{obj.key}: changed in {self.scheme}://{self.bucket} "
                                     "since it was listed", uri=obj.uri)
            return data

        return Blob.ranged(fetch, obj.size)

    def stat(self, key: str) -> SourceObject | None:
        try:
            return self._object(obstore.head(self.store, self.prefix + key))
        except NotFoundError:
            return None
        except BaseError as exc:
            raise self._error("cannot read", exc, key) from None

    @lru_cache(maxsize=64)  # noqa: B019 - one connector per run; a folder's names are reused
    def names_in(self, folder: str) -> frozenset[str]:
        prefix = self.prefix + (f"{folder}/" if folder else "")
        try:
            listing = obstore.list_with_delimiter(self.store, prefix=prefix or None)
        except BaseError as exc:
            raise self._error("cannot list", exc, folder) from None
        return frozenset(str(m["path"]).rsplit("/", 1)[-1] for m in listing["objects"])


def _version(meta: Any) -> str | None:
    """An object's version as the listing gives it: its object version, else its ETag."""
    version = meta.get("version") or (meta.get("e_tag") or "").strip('"') or None
    return f"etag:{version}" if version else None
