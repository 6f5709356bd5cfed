"""pairing: the whole-array bracket matching against a stack per group, the plainest LIFO pairing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kprobe_exporter import pairing


def stacks(group: list[int], sign: list[int]) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(entry, exit) pairs, unmatched exits and open entries (by group, bottom first), one stack a group."""
    open_: dict[int, list[int]] = {}
    pairs, unmatched = [], []
    for i, (g, s) in enumerate(zip(group, sign, strict=True)):
        if s > 0:
            open_.setdefault(g, []).append(i)
        elif open_.get(g):
            pairs.append((open_[g].pop(), i))
        else:
            unmatched.append(i)
    left = [i for g in sorted(open_) for i in open_[g]]
    return sorted(pairs), unmatched, left


events = st.lists(st.tuples(st.integers(0, 3), st.sampled_from([1, 1, -1])), max_size=60)


@settings(max_examples=300, deadline=None)
@given(events)
def test_match_is_lifo_per_group(evs: list[tuple[int, int]]) -> None:
    evs = sorted(evs, key=lambda e: e[0])  # match wants each group's elements together, in time order
    group = np.array([g for g, _ in evs], np.int64)
    sign = np.array([s for _, s in evs], np.int64)
    m = pairing.match(group, sign)
    want_pairs, want_unmatched, want_open = stacks(group.tolist(), sign.tolist())
    got_pairs = sorted(zip(m.entries.tolist(), m.exits.tolist(), strict=True))
    assert got_pairs == want_pairs
    assert np.flatnonzero(m.unmatched).tolist() == want_unmatched
    assert m.open.tolist() == want_open


def test_nesting_pairs_inner_first_and_reports_depth() -> None:
    # one thread: f( g( ) g( ) ) then a stray exit
    m = pairing.match(np.zeros(7, np.int64), np.array([1, 1, -1, 1, -1, -1, -1], np.int64))
    assert sorted(zip(m.entries.tolist(), m.exits.tolist(), strict=True)) == [(0, 5), (1, 2), (3, 4)]
    assert np.flatnonzero(m.unmatched).tolist() == [6]
    assert m.open.tolist() == [] and m.depth_max == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**40), max_size=200), st.booleans())
def test_stable_order_is_a_stable_argsort(keys: list[int], huge: bool) -> None:
    key = np.array(keys, np.int64)
    if huge and len(key):
        key[0] = 2**61  # too wide to pack with positions: the merge-sort fallback
    assert pairing.stable_order(key).tolist() == np.argsort(key, kind="stable").tolist()
