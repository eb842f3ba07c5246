"""The one typed configuration of avflow: its sections by owner (`sections.py`), and how YAML files,
`section.key=value` overrides and stored configs are read into it (`loading.py`). Every stage imports it from here.
"""

from avflow.config.loading import MOVED_KEYS, config_from_dict, load_config, parse_overrides, with_overrides
from avflow.config.sections import (
    DEFAULT_IDENTITY,
    TOOL_SECTIONS,
    Config,
    ConfigError,
    CorpusConfig,
    DataConfig,
    EvaluateConfig,
    FlowConfig,
    HeadVAEConfig,
    LoaderConfig,
    MelConfig,
    MetricName,
    ModelConfig,
    PackConfig,
    ParallelConfig,
    SampleConfig,
    SourceConfig,
    Text2TokensConfig,
    TrainerConfig,
)

__all__ = [
    "MOVED_KEYS", "config_from_dict", "load_config", "parse_overrides", "with_overrides", "DEFAULT_IDENTITY",
    "TOOL_SECTIONS", "Config", "ConfigError", "CorpusConfig", "DataConfig", "EvaluateConfig", "FlowConfig",
    "HeadVAEConfig", "LoaderConfig", "MelConfig", "MetricName", "ModelConfig", "PackConfig", "ParallelConfig",
    "SampleConfig", "SourceConfig", "Text2TokensConfig", "TrainerConfig",
]
