"""S3-compatible object stores (AWS S3, MinIO, SeaweedFS, R2, GCS interoperability) via obstore.

- Listing is paginated and lazy (pages of 1,000 keys): a bucket of any size never sits in memory.
  S3 lists in key order, which is the ``uri`` order the manifest diff merges in (a store that
  does not is still diffed right, holding what it skipped in memory).
- The version of an object is its ETag (or version id where the bucket keeps versions): an
  unchanged object is recognised from the listing alone, without reading its body.
- Reads are retried by obstore on 5xx, resets and timeouts (``max_retries``, ``timeout_s``).
- Failures become one-line :class:`ConnectorError`s naming the bucket and endpoint, never a
  secret. The S3 error code in the response (``NoSuchBucket``, ``AccessDenied``, ...) decides the
  message; it is the protocol's structured code, not prose.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from functools import lru_cache
from typing import Any

import obstore
import pyarrow as pa
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from connectors.base import key_selected, listing_batches
from connectors.s3_options import S3_HINTS, TRANSIENT_CODES, resolved, s3_error_code
from pipeline.config import S3Options, S3SourceConfig
from pipeline.errors import ConnectorError, TransientConnectorError
from pipeline.records import Reject, SourceObject


def make_store(bucket: str, opts: S3Options) -> S3Store:
    r = resolved(opts)
    config: Any = {k: v for k, v in (("endpoint", r["endpoint"]), ("region", r["region"]),
                                ("access_key_id", r["access_key_id"]),
                                ("secret_access_key", r["secret_access_key"]),
                                ("session_token", r["session_token"])) if v}
    config["virtual_hosted_style_request"] = opts.virtual_hosted_style
    if not r["access_key_id"]:
        config["skip_signature"] = True  # a public bucket
    return S3Store(
        bucket, config=config,
        client_options={"allow_http": r["allow_http"],
                        "timeout": timedelta(seconds=opts.timeout_s),
                        "connect_timeout": timedelta(seconds=min(opts.timeout_s, 10))},
        retry_config={"max_retries": opts.max_retries,
                      "backoff": {"init_backoff": timedelta(milliseconds=200),
                                  "max_backoff": timedelta(seconds=10), "base": 2},
                      "retry_timeout": timedelta(seconds=opts.timeout_s * 2)})


class S3Connector:
    def __init__(self, config: S3SourceConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        settings = resolved(config)
        self.endpoint = settings["endpoint"] or "AWS S3"
        self.store = make_store(config.bucket, config)
        self._secrets = [v for v in (settings["secret_access_key"], settings["session_token"])
                         if v]

    def _error(self, doing: str, exc: BaseException, key: str | None = None) -> ConnectorError:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        code = s3_error_code(text)
        where = f"s3://{self.bucket}/{self.prefix}{key or ''} at {self.endpoint}"
        if code in S3_HINTS:
            return ConnectorError(f"{doing} {where}: {S3_HINTS[code]}")
        if code in TRANSIENT_CODES or "connect" in text.lower() or "timed out" in text.lower():
            return TransientConnectorError(f"{doing} {where}: the endpoint cannot be reached or "
                                           f"is failing ({code or type(exc).__name__})")
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        return ConnectorError(f"{doing} {where}: {code or first}")

    def _object(self, meta: Any) -> SourceObject:
        path = str(meta["path"])
        version = meta.get("version") or (meta.get("e_tag") or "").strip('"') or None
        return SourceObject(uri=f"s3://{self.bucket}/{path}", key=path[len(self.prefix):],
                            size=int(meta["size"]), mtime=meta["last_modified"],
                            version=f"etag:{version}" if version else None)

    def list(self) -> Iterator[SourceObject | Reject]:
        try:
            for page in obstore.list(self.store, prefix=self.prefix or None, chunk_size=1000):
                for meta in page:
                    key = str(meta["path"])[len(self.prefix):]
                    if key and not key.endswith("/") and key_selected(
                            key, self.config.include, self.config.exclude):
                        yield self._object(meta)
        except BaseError as exc:
            raise self._error("cannot list", exc) from None

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        return listing_batches(self.list())

    def read(self, obj: SourceObject) -> bytes:
        try:
            return bytes(obstore.get(self.store, self.prefix + obj.key).bytes())
        except NotFoundError:
            raise ConnectorError(f"{obj.key}: gone from s3://{self.bucket} before it could be "
                                 "read", uri=obj.uri) from None
        except BaseError as exc:
            raise self._error("cannot read", exc, obj.key) from None

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
