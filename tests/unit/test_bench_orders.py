"""bench.blockscript_add's contestant orders: no contestant may always run right after the same
other one (the bash script's add, ~50 ms of CPU, charged whoever followed it ~1 ms: bench/README.md,
issue 18, session 15)."""

from __future__ import annotations

import itertools

import pytest

from bench.blockscript_add import _balanced_orders


def _follows(rows: list[list[int]], *, cyclic: bool) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    if cyclic:  # the rows run one after another, round and round
        flat = [x for row in rows for x in row]
        pairs = list(zip(flat, flat[1:] + flat[:1], strict=True))
    else:
        pairs = [pair for row in rows for pair in itertools.pairwise(row)]
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return counts


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_every_contestant_follows_every_other_equally_often(n: int) -> None:
    rows = _balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    within = _follows(rows, cyclic=False)
    assert set(within) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(within.values())) == 1, within


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_last_contestant_precedes_each_other_equally_often_across_iterations(n: int) -> None:
    follows = _follows(_balanced_orders(n), cyclic=True)
    after_last = [follows.get((n - 1, x), 0) for x in range(n - 1)]
    assert len(set(after_last)) == 1, after_last
