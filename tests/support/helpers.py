"""Small helpers shared by the tests (no mocks of the code under test)."""

from __future__ import annotations

from typing import Any

import yaml

from kdcompose import KDConfig, parse_config
from kdcompose.errors import ConfigError


def config_from(**sections: Any) -> KDConfig:
    return parse_config(sections)


def config_error(data: Any) -> ConfigError:
    try:
        parse_config(data)
    except ConfigError as exc:
        return exc
    raise AssertionError(f"config was accepted but should fail: {data!r}")


def yaml_round_trip(data: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))
