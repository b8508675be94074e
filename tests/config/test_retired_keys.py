"""Config keys fnl no longer reads: gone from the defaults, dropped from configs an older fnl stored, refused in
config files."""

import pytest

from fnl.config import ConfigError, get_cfg, load_config, stored_config
from fnl.config.defaults import RETIRED_KEYS


def _old_fnl_dump() -> str:
    """A config as an fnl that still had the retired keys wrote it into checkpoints."""
    cfg = get_cfg()
    cfg.VERSION = 2
    cfg.MODEL.ROI_BOX_HEAD.NORM = ""
    cfg.TEST.EVAL_PERIOD = 0
    return cfg.dump()


def test_retired_keys_are_not_defaults():
    cfg = get_cfg()
    for key in RETIRED_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        assert leaf not in node, key


def test_a_stored_config_with_retired_keys_loads():
    assert stored_config(_old_fnl_dump(), source="an old checkpoint") == get_cfg()


def test_a_config_file_setting_a_retired_key_is_refused(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("TEST:\n  EVAL_PERIOD: 100\n")
    with pytest.raises(ConfigError, match="TEST.EVAL_PERIOD"):
        load_config(path)
