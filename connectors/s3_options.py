"""S3 settings resolved from the job and the standard environment variables, in the shapes
obstore and Lance take. Kept apart from connectors/s3.py so that code which only needs the
settings (the Lance sink on s3://) does not load the object-store client."""

from __future__ import annotations

import os
import re
from typing import Any

from pipeline.config import S3Options

_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
S3_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied (the credentials may not use this bucket)",
    "InvalidAccessKeyId": "wrong credentials (unknown access key)",
    "SignatureDoesNotMatch": "wrong credentials (the secret key does not match)",
    "ExpiredToken": "the session token has expired",
}
# The codes about the bucket or the credentials, never one object (AccessDenied may be one
# object's policy: it stays that file's reject).
SOURCE_CODES = frozenset({"NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                          "ExpiredToken"})
TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})


def s3_error_code(text: str) -> str | None:
    """The S3 error code a response carried (its structured <Code>, not its prose)."""
    m = _CODE.search(text)
    return m.group(1) if m else None


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def resolved(opts: S3Options) -> dict[str, Any]:
    """The options with the standard environment variables filling what the job leaves unset."""
    endpoint = opts.endpoint_url or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    return {
        "endpoint": endpoint,
        "region": opts.region or _env("AWS_REGION") or _env("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key_id": (opts.access_key_id.get_secret_value() if opts.access_key_id
                          else _env("AWS_ACCESS_KEY_ID")),
        "secret_access_key": (opts.secret_access_key.get_secret_value()
                              if opts.secret_access_key else _env("AWS_SECRET_ACCESS_KEY")),
        "session_token": (opts.session_token.get_secret_value() if opts.session_token
                          else _env("AWS_SESSION_TOKEN")),
        "allow_http": (opts.allow_http if opts.allow_http is not None
                       else bool(endpoint and endpoint.startswith("http://"))),
    }


def lance_storage_options(opts: S3Options) -> dict[str, str]:
    """The same settings in the shape Lance (object_store) takes for an s3:// table."""
    r = resolved(opts)
    out = {"aws_region": r["region"], "allow_http": str(r["allow_http"]).lower(),
           "virtual_hosted_style_request": str(opts.virtual_hosted_style).lower()}
    for ours, theirs in (("endpoint", "aws_endpoint"), ("access_key_id", "aws_access_key_id"),
                         ("secret_access_key", "aws_secret_access_key"),
                         ("session_token", "aws_session_token")):
        if r[ours]:
            out[theirs] = r[ours]
    return out
