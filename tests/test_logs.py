"""shared.logs.RateLimitedLog: at most one line per period, the rest counted."""

from __future__ import annotations

import logging

from shared.logs import RateLimitedLog


def test_one_line_per_period_and_the_held_back_ones_counted(caplog):
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), every_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert log.warning("bad message from %s", "a") is True
        now[0] += 1
        assert log.warning("bad message from %s", "b") is False
        assert log.warning("bad message from %s", "c") is False
        now[0] += 5
        assert log.warning("bad message from %s", "d") is True
    assert [r.getMessage() for r in caplog.records] == [
        "bad message from a",
        "bad message from d (+2 more not logged)",
    ]
    assert log.suppressed == 0
