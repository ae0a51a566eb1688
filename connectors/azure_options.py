"""Azure Blob Storage settings resolved from the job, a connection string and the standard
environment variables, in the shapes obstore and Lance take (kept apart from
connectors/azure.py, as connectors/s3_options.py is from connectors/s3.py)."""

from __future__ import annotations

import os
import re
from typing import Any

from pipeline.config import AzureOptions

_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
AZURE_HINTS = {
    "ContainerNotFound": "the container does not exist",
    "AuthenticationFailed": "wrong credentials (the key or SAS does not match the account)",
    "AuthorizationFailure": ("access denied (wrong credentials, or credentials that may not use "
                             "this container)"),
    "AuthorizationPermissionMismatch": "access denied (the credentials lack the permission)",
    "AccountIsDisabled": "the storage account is disabled",
    "InvalidResourceName": "the container's name is not valid",
}
# The codes about the container, the account or the credentials, never one blob (an
# authorization failure may be one blob's condition: it stays that file's reject).
SOURCE_CODES = frozenset({"ContainerNotFound", "AuthenticationFailed", "AccountIsDisabled",
                          "InvalidResourceName"})
TRANSIENT_CODES = frozenset({"ServerBusy", "InternalError", "OperationTimedOut"})


def azure_error_code(text: str) -> str | None:
    """The error code an Azure response carried (its structured <Code>)."""
    m = _CODE.search(text)
    return m.group(1) if m else None


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _connection_string(text: str | None) -> dict[str, str]:
    """``Key=Value;...`` (values may hold ``=``, as base64 keys do)."""
    fields: dict[str, str] = {}
    for part in (text or "").split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            fields[name.strip()] = value.strip()
    return fields


def resolved(opts: AzureOptions) -> dict[str, Any]:
    """The options with a connection string and the environment filling what the job leaves
    unset: the job's own keys first, then its connection string, then the environment's."""
    conn = _connection_string(_secret(opts.connection_string)
                              or _env("AZURE_STORAGE_CONNECTION_STRING"))
    endpoint = opts.endpoint_url or conn.get("BlobEndpoint") or _env("AZURE_STORAGE_ENDPOINT")
    return {
        "account_name": (opts.account_name or conn.get("AccountName")
                         or _env("AZURE_STORAGE_ACCOUNT_NAME") or _env("AZURE_STORAGE_ACCOUNT")),
        "account_key": (_secret(opts.account_key) or conn.get("AccountKey")
                        or _env("AZURE_STORAGE_ACCOUNT_KEY") or _env("AZURE_STORAGE_KEY")),
        "sas_token": (_secret(opts.sas_token) or conn.get("SharedAccessSignature")
                      or _env("AZURE_STORAGE_SAS_TOKEN")),
        "endpoint": endpoint.rstrip("/") if endpoint else None,
        "allow_http": (opts.allow_http if opts.allow_http is not None
                       else bool(endpoint and endpoint.startswith("http://"))),
    }


def object_store_config(opts: AzureOptions) -> dict[str, Any]:
    """obstore's (and Lance's: both are object_store's) keys for these settings. A service
    principal (AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID) or a managed identity
    are read from the environment by object_store itself."""
    r = resolved(opts)
    return {key: value for key, value in (
        ("azure_storage_account_name", r["account_name"]),
        ("azure_storage_account_key", r["account_key"]),
        ("azure_storage_sas_key", r["sas_token"].lstrip("?") if r["sas_token"] else None),
        ("azure_storage_endpoint", r["endpoint"])) if value}


def lance_storage_options(opts: AzureOptions) -> dict[str, str]:
    """The settings in the shape Lance takes for an az:// table."""
    return {**object_store_config(opts), "allow_http": str(resolved(opts)["allow_http"]).lower()}


def secrets_of(opts: AzureOptions) -> list[str]:
    """What must never be printed."""
    r = resolved(opts)
    return [v for v in (r["account_key"], r["sas_token"]) if v]
