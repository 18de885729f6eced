"""pipeline.schedule is checked when the config is read, and read as a value."""

from __future__ import annotations

import pytest

from stagewise.config import Config
from stagewise.errors import ConfigError
from stagewise.schedule.registry import ScheduleChoice


def test_schedule_names_are_canonical_and_checked_at_once() -> None:
    config = Config.from_dict({"pipeline": {"schedule": "ZB_H1"}})
    assert config.pipeline.schedule == "zb-h1"
    assert config.pipeline.choice == ScheduleChoice("zb-h1", None)
    assert config.pipeline.choice.layout(4).chunks == 1
    with pytest.raises(ConfigError, match=r"pipeline.schedule .*unknown pipeline schedule 'zbh1'"):
        Config.from_dict({"pipeline": {"schedule": "zbh1"}})
    with pytest.raises(ConfigError, match=r"pipeline.schedule / pipeline.virtual_stages"):
        Config.from_dict({"pipeline": {"schedule": "zbv", "virtual_stages": 3}})
    interleaved = Config.from_dict({"pipeline": {"schedule": "interleaved", "virtual_stages": 3}})
    assert interleaved.pipeline.choice.layout(2).chunks == 3
