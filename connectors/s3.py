"""S3-compatible object stores (AWS S3, MinIO, SeaweedFS, R2, GCS interoperability) via obstore
(what every object store's connector shares: :mod:`connectors.objects`).

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

from typing import Any

from obstore.store import S3Store

from connectors.objects import ObjectConnector, client_settings
from connectors.s3_options import (
    S3_HINTS,
    SOURCE_CODES,
    TRANSIENT_CODES,
    resolved,
    s3_error_code,
)
from pipeline.config import S3Options, S3SourceConfig


def make_store(bucket: str, opts: S3Options) -> S3Store:
    r = resolved(opts)
    config: Any = {k: v for k, v in (("endpoint", r["endpoint"]), ("region", r["region"]),
                                ("access_key_id", r["access_key_id"]),
                                ("secret_access_key", r["secret_access_key"]),
                                ("session_token", r["session_token"])) if v}
    config["virtual_hosted_style_request"] = opts.virtual_hosted_style
    if not r["access_key_id"]:
        config["skip_signature"] = True  # a public bucket
    return S3Store(bucket, config=config,
                   **client_settings(r["allow_http"], opts.timeout_s, opts.max_retries))


class S3Connector(ObjectConnector):
    scheme = "s3"
    hints = S3_HINTS
    source_codes = SOURCE_CODES
    transient = TRANSIENT_CODES

    def __init__(self, config: S3SourceConfig) -> None:
        settings = resolved(config)
        super().__init__(make_store(config.bucket, config), config.bucket, config.prefix,
                         config.include, config.exclude, settings["endpoint"] or "AWS S3",
                         [v for v in (settings["secret_access_key"], settings["session_token"])
                          if v])
        self.config = config

    def error_code(self, text: str) -> str | None:
        return s3_error_code(text)
