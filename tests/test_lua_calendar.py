"""The Lua calendar (lua/_lib.lua period_end and its civil-date helpers), fast, on the real Redis:
month ends (28, 29, 30, 31 days; December into January), leap years (2000 yes, 1900 and 2100
no), week starts (Monday 00:00 UTC from every weekday), day ends and fixed windows, against
Python's datetime. The balance script runs it at the server's clock; arbitrary dates go through
the same library functions with a one-line probe script."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta, timezone
from typing import Any

from quota_gw.decisions import Decider
from quota_gw.layout import Layout
from quota_gw.scripts import lua_dir

# The library (init() takes the globals it uses, as scripts.py does), then: period_end(spec, t)
# for each t in ARGV[2..].
PROBE = (lua_dir() / "_lib.lua").read_text() + """
init()
local out = {}
for i = 2, #ARGV do table.insert(out, period_end(ARGV[1], tonumber(ARGV[i]))) end
return out
"""

UTC = timezone.utc


def ts(d: datetime) -> int:
    return int(d.timestamp())


def next_month(d: datetime) -> datetime:
    return datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)


def next_monday(d: datetime) -> datetime:
    day = datetime(d.year, d.month, d.day, tzinfo=UTC)
    return day + timedelta(days=7 - d.weekday())


async def period_ends(redis: Any, spec: str, times: list[int]) -> list[int]:
    return [int(x) for x in await redis.eval(PROBE, 0, spec, *times)]


async def test_month_ends_over_four_centuries_and_leap_years(redis: Any) -> None:
    times, want = [], []
    for year in (1970, 1999, 2000, 2023, 2024, 2025, 2100, 2399, 2400):
        for month in range(1, 13):
            last = calendar.monthrange(year, month)[1]
            for d in (datetime(year, month, 1, tzinfo=UTC), datetime(year, month, last, 23, 59, 59, tzinfo=UTC)):
                times.append(ts(d))
                want.append(ts(next_month(d)))
    assert await period_ends(redis, "month", times) == want
    # February: 29 days in 2000 and 2024, 28 in 1900 and 2100.
    for year, days in ((2000, 29), (2024, 29), (1900, 28), (2100, 28), (2023, 28)):
        feb_last = datetime(year, 2, days, 12, tzinfo=UTC)
        assert await period_ends(redis, "month", [ts(feb_last)]) == [ts(datetime(year, 3, 1, tzinfo=UTC))]


async def test_weeks_start_on_monday_from_every_weekday(redis: Any) -> None:
    start = datetime(2024, 2, 26, tzinfo=UTC)  # a Monday, across a leap day and a month end
    times = [ts(start + timedelta(hours=h)) for h in range(0, 24 * 21, 5)]
    want = [ts(next_monday(datetime.fromtimestamp(t, UTC))) for t in times]
    assert await period_ends(redis, "week", times) == want
    monday = ts(datetime(2024, 3, 4, tzinfo=UTC))
    assert await period_ends(redis, "week", [monday - 1, monday]) == [monday, monday + 7 * 86400]


async def test_days_and_fixed_windows(redis: Any) -> None:
    t = ts(datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert await period_ends(redis, "day", [t, t + 1]) == [t + 1, t + 1 + 86400]
    assert await period_ends(redis, "3600s", [7199, 7200]) == [7200, 10800]


async def test_the_balance_script_ends_the_period_where_the_calendar_says(redis: Any, config: Any,
                                                                          prefix: str) -> None:
    decider = Decider(redis, config, Layout(f"{prefix}:cal", 16))
    before = datetime.now(UTC)
    out = {}
    for period in ("month", "week", "day", "3600s"):
        plan = config.plans["pro"].model_copy(update={"period": period})
        out[period] = (await decider.balances(f"cal-{period}", plan))["general"]["period_end"]
    after = datetime.now(UTC)
    await decider.aclose()
    assert out["month"] in {ts(next_month(before)), ts(next_month(after))}
    assert out["week"] in {ts(next_monday(before)), ts(next_monday(after))}
    assert out["day"] in {ts(datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(days=1)) for d in (before, after)}
    assert out["3600s"] in {(ts(d) // 3600 + 1) * 3600 for d in (before, after)}
