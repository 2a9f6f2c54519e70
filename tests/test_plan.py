"""Shard plans: ranges in proportion to shares, the even split as the special case of equal shares."""

from __future__ import annotations

from fractions import Fraction

import pytest

from dmoe.plan import parse_shares, share_ranges


def _even(n: int, parts: int, unit: int) -> list[tuple[int, int]]:
    """The even split as plan.py always made it: the first units % parts ranges one unit longer, the last
    taking the remainder that is not a whole unit."""
    units, rem = divmod(n, unit)
    sizes = [(units // parts + (p < units % parts)) * unit for p in range(parts)]
    sizes[-1] += rem
    return [(sum(sizes[:p]), sum(sizes[:p + 1])) for p in range(parts)]


@pytest.mark.parametrize("n", [1, 7, 32, 100, 768, 151936])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("unit", [1, 32])
def test_equal_shares_are_the_even_split(n: int, parts: int, unit: int) -> None:
    assert share_ranges(n, [Fraction(1)] * parts, unit) == _even(n, parts, unit)


@pytest.mark.parametrize("shares", ["3,1", "1,2,1", "0.5,1.5", "5,3,2,1"])
@pytest.mark.parametrize(("n", "unit"), [(32, 1), (128, 1), (768, 32), (151936, 1)])
def test_ranges_follow_the_shares(shares: str, n: int, unit: int) -> None:
    s = parse_shares(shares, len(shares.split(",")))
    ranges = share_ranges(n, s, unit)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    units = n // unit
    for (a, b), share in zip(ranges[:-1], s, strict=False):
        assert (b - a) % unit == 0 and abs((b - a) // unit - units * share / sum(s)) < 1


@pytest.mark.parametrize(("text", "world", "message"), [("3,x", 2, "positive numbers separated"),
                                                         ("3,1", 3, "needs 3 positive numbers"),
                                                         ("1,0", 2, "needs 2 positive numbers"),
                                                         ("1,-2", 2, "needs 2 positive numbers")])
def test_bad_shares_are_refused(text: str, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_shares(text, world)
