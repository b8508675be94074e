"""detectron2-style configuration: YAML files with ``_BASE_`` inheritance and ``KEY VALUE`` overrides."""

from fnl.config.config import CfgNode, ConfigError
from fnl.config.load import CONFIGS_DIR, find_config_file, get_cfg, load_config, stored_config

__all__ = ["CONFIGS_DIR", "CfgNode", "ConfigError", "find_config_file", "get_cfg", "load_config", "stored_config"]
