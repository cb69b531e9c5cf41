"""The engine's own knobs in ``InterfaceConfig``: bad values are refused when the config is built."""

from __future__ import annotations

import pytest

from tunnelmesh.node.dataplane import IDLE_WAIT, WARM_TICK, InterfaceConfig
from tunnelmesh.node.errors import DataplaneError

KEY = bytes(32)


@pytest.mark.parametrize("tick", [0, WARM_TICK, IDLE_WAIT])
def test_warm_tick_is_off_or_up_to_the_long_wait(tick: float) -> None:
    assert InterfaceConfig(private_key=KEY, warm_tick=tick).warm_tick == tick


@pytest.mark.parametrize("tick", [-0.001, IDLE_WAIT + 0.001, 5.0])
def test_a_warm_tick_out_of_range_is_refused(tick: float) -> None:
    with pytest.raises(DataplaneError, match="warm tick must be 0"):
        InterfaceConfig(private_key=KEY, warm_tick=tick)
