"""Where the job's sink lives and how to reach it: Lance's storage options for an ``s3://`` or
``az://`` sink (its own settings, else the source's when the source is on the same kind of
store, else the environment's), and an obstore store on the sink's folder for the job's lock.
The object-store clients are imported only when a store is made."""

from __future__ import annotations

from typing import Any

from connectors.azure_options import lance_storage_options as azure_lance_options
from connectors.s3_options import lance_storage_options as s3_lance_options
from pipeline.config import AzureOptions, AzureSourceConfig, JobConfig, S3Options, S3SourceConfig


def sink_s3_options(job: JobConfig) -> S3Options:
    """An s3:// sink's settings: its own, else the source's when that is on S3, else the
    environment's."""
    if job.sink.s3 is not None:
        return job.sink.s3
    if isinstance(job.source, S3SourceConfig):
        return job.source
    return S3Options()


def sink_azure_options(job: JobConfig) -> AzureOptions:
    """An az:// sink's settings: its own, else the source's when that is on Azure, else the
    environment's."""
    if job.sink.azure is not None:
        return job.sink.azure
    if isinstance(job.source, AzureSourceConfig):
        return job.source
    return AzureOptions()


def storage_options_for(uri: str, job: JobConfig, s3: S3Options | None = None,
                        azure: AzureOptions | None = None) -> dict[str, str] | None:
    """Lance's storage options for a table at ``uri`` (None for a local folder)."""
    if uri.startswith("s3://"):
        return s3_lance_options(s3 or sink_s3_options(job))
    if uri.startswith(("az://", "abfs://", "abfss://")):
        return azure_lance_options(azure or sink_azure_options(job))
    return None


def sink_storage_options(job: JobConfig) -> dict[str, str] | None:
    """Lance's storage options for the job's sink."""
    return storage_options_for(job.sink.uri, job)


def sink_object_store(job: JobConfig) -> tuple[Any, str] | None:
    """An obstore store on the sink's bucket or container and the sink's folder in it (for the
    job's lock); None for a local sink."""
    uri = job.sink.uri
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme == "s3":
        from connectors.s3 import make_store

        return make_store(bucket, sink_s3_options(job)), prefix.strip("/")
    if scheme == "az":
        from connectors.azure import make_azure_store

        return make_azure_store(bucket, sink_azure_options(job)), prefix.strip("/")
    return None
