"""Fixtures of the concurrency tests."""

import pytest
import time_machine

from tests.concurrency.test_queue_positions import NOW


@pytest.fixture
def clock():
    """Time frozen at NOW; `clock.shift(seconds)` moves it."""
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller
