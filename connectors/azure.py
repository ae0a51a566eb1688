"""Azure Blob Storage containers (and Azurite) via obstore: ``az://container/key`` uris, each
blob's ETag as its version; what it shares with S3 is :mod:`connectors.objects`'s."""

from __future__ import annotations

from obstore.store import AzureStore

from connectors.azure_options import (
    AZURE_HINTS,
    SOURCE_CODES,
    TRANSIENT_CODES,
    azure_error_code,
    object_store_config,
    resolved,
    secrets_of,
)
from connectors.objects import ObjectConnector, client_settings
from pipeline.config import AzureOptions, AzureSourceConfig


def make_azure_store(container: str, opts: AzureOptions) -> AzureStore:
    return AzureStore(container, config=object_store_config(opts),  # type: ignore[arg-type]
                      **client_settings(resolved(opts)["allow_http"], opts.timeout_s,
                                        opts.max_retries))


class AzureConnector(ObjectConnector):
    scheme = "az"
    hints = AZURE_HINTS
    source_codes = SOURCE_CODES
    transient = TRANSIENT_CODES

    def __init__(self, config: AzureSourceConfig) -> None:
        settings = resolved(config)
        endpoint = settings["endpoint"] or (
            f"https://{settings['account_name']}.blob.core.windows.net"
            if settings["account_name"] else "Azure")
        super().__init__(make_azure_store(config.container, config), config.container,
                         config.prefix, config.include, config.exclude, endpoint,
                         secrets_of(config))
        self.config = config

    def error_code(self, text: str) -> str | None:
        return azure_error_code(text)
