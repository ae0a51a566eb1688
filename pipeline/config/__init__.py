"""Job files: YAML -> typed, frozen pydantic models.

- :mod:`pipeline.config.sources`: the ``source`` section (local folder, S3 bucket, companions);
- :mod:`pipeline.config.job`: ``embed``, ``validate``, ``sink``, ``run`` and :class:`JobConfig`;
- :mod:`pipeline.config.loading`: :func:`load_job`, the only entry point (``${VAR}``
  expansion, one :class:`~pipeline.errors.ConfigError` naming the file and key path).
"""

from pipeline.config.job import (
    ArrowSinkConfig,
    BatchSettings,
    EmbedConfig,
    EmulatorEmbedConfig,
    EmulatorSettings,
    GeminiEmbedConfig,
    JobConfig,
    LanceSinkConfig,
    QuotaConfig,
    ReuseSource,
    RunConfig,
    SinkConfig,
    ValidateConfig,
)
from pipeline.config.loading import load_job
from pipeline.config.sources import (
    GOOGLE_BASE_URL,
    AzureOptions,
    AzureSourceConfig,
    LocalSourceConfig,
    MetadataConfig,
    S3Options,
    S3SourceConfig,
    SourceConfig,
    SyntheticSourceConfig,
)

__all__ = [
    "GOOGLE_BASE_URL",
    "ArrowSinkConfig",
    "AzureOptions",
    "AzureSourceConfig",
    "BatchSettings",
    "EmbedConfig",
    "EmulatorEmbedConfig",
    "EmulatorSettings",
    "GeminiEmbedConfig",
    "JobConfig",
    "LanceSinkConfig",
    "LocalSourceConfig",
    "MetadataConfig",
    "QuotaConfig",
    "ReuseSource",
    "RunConfig",
    "S3Options",
    "S3SourceConfig",
    "SinkConfig",
    "SourceConfig",
    "SyntheticSourceConfig",
    "ValidateConfig",
    "load_job",
]
