"""Sources of files: one module per kind, each implementing connectors.base.Connector."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connectors.base import Connector
    from pipeline.config import JobConfig


def connector_for(job: JobConfig) -> Connector:
    """The connector of the job's source (object stores load their client only when used)."""
    from pipeline.config import AzureSourceConfig, LocalSourceConfig, SyntheticSourceConfig

    if isinstance(job.source, LocalSourceConfig):
        from connectors.local import LocalConnector

        return LocalConnector(job.source)
    if isinstance(job.source, SyntheticSourceConfig):
        from connectors.synthetic import SyntheticConnector

        return SyntheticConnector(job.source)
    if isinstance(job.source, AzureSourceConfig):
        from connectors.azure import AzureConnector

        return AzureConnector(job.source)
    from connectors.s3 import S3Connector

    return S3Connector(job.source)
