"""Pairing: per-thread LIFO matching of entries and exits as bracket matching over whole arrays.

Why: a stack per thread in a per-line loop is slow in CPython (bench/README.md). LIFO pairing per
thread is bracket matching: within one thread the nesting depth is a running sum of +1 (entry) and
-1 (exit), floored at zero so that an exit with nothing open is unmatched and changes nothing; and
a stable sort by (thread, depth) puts every entry right before its exit. Both are whole-array
operations.

Sorting: numpy's stable argsort of int64 is a merge sort; np.sort of int64 is a SIMD quicksort,
much faster. Packing (key, position) into one int64 makes every key distinct, so the fast unstable
sort gives the stable order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


def stable_order(key: I64) -> I64:
    """np.argsort(key, kind='stable') for non-negative keys, by sorting (key << bits) | position."""
    n = len(key)
    if n == 0:
        return np.zeros(0, np.int64)
    bits = max(1, int(n - 1).bit_length())
    top = int(key.max())
    if top < 0 or int(key.min()) < 0 or top.bit_length() + bits > 62:
        return np.argsort(key, kind="stable").astype(np.int64)
    packed = np.sort((key << bits) | np.arange(n, dtype=np.int64))
    out: I64 = packed & ((1 << bits) - 1)
    return out


class Matched(NamedTuple):
    entries: I64  # positions (in the grouped arrays) of entries that found their exit
    exits: I64  # the exit of each of them
    unmatched: Bool  # exits with nothing open in their group
    open: I64  # entries still open at the end, by group and then depth (bottom of the stack first)
    depth_max: int


def match(group: I64, sign: I64) -> Matched:
    """LIFO matching within groups. `group` must be non-decreasing (elements of one group together,
    in time order, a group's still-open entries from before first); `sign` is +1 entry, -1 exit."""
    n = len(group)
    if n == 0:
        z = np.zeros(0, np.int64)
        return Matched(z, z, np.zeros(0, bool), z, 0)
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(group[1:], group[:-1], out=first[1:])
    gidx = np.cumsum(first) - 1
    c = np.cumsum(sign)
    starts = np.flatnonzero(first)
    cg = c - (c[starts] - sign[starts])[gidx]  # running sum within the group
    # Floor at zero (Skorokhod reflection): depth = sum - min(0, running min of sum). The running
    # min restarts per group because each group is shifted below everything before it.
    big = 2 * n + 4
    shift = gidx * big
    low = np.minimum.accumulate(cg - shift) + shift
    depth = cg - np.minimum(low, 0)
    before = np.empty(n, np.int64)
    before[0] = 0
    before[1:] = depth[:-1]
    before[first] = 0
    is_exit = sign < 0
    unmatched = is_exit & (before == 0)
    level = np.where(is_exit, before, depth)  # an entry opens `level`, its exit closes it
    keep = np.flatnonzero(~unmatched)
    depth_max = int(level[keep].max()) if len(keep) else 0
    if depth_max > 1:  # nesting: runs of one (group, level) alternate entry, exit, entry, ...
        lk = level[keep]
        keep = keep[stable_order(gidx[keep] * (depth_max + 1) + lk)]
    x = is_exit[keep]
    xi = np.flatnonzero(x)
    exits = keep[xi]
    entries = keep[xi - 1]
    ei = np.flatnonzero(~x)
    nxt = ei + 1
    closed = np.zeros(len(ei), bool)
    inside = nxt < len(keep)
    closed[inside] = x[nxt[inside]]
    return Matched(entries, exits, unmatched, keep[ei[~closed]], depth_max)
