"""detectron2-style configuration: YAML files with ``_BASE_`` inheritance and ``KEY VALUE`` overrides."""

from fnl.config.config import CfgNode, ConfigError, find_config_file, get_cfg, load_config
from fnl.config.defaults import _C as DEFAULT_CONFIG

__all__ = ["CfgNode", "ConfigError", "DEFAULT_CONFIG", "find_config_file", "get_cfg", "load_config"]
