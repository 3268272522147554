"""The batch sizes captured as decode graphs: every live batch size has a graph that fits it,
with little padding, and the ladder ends at the configured maximum."""

from __future__ import annotations

import pytest

from armature.engine.cuda_graph import batch_size_ladder


@pytest.mark.parametrize("max_bs", [1, 3, 8, 20, 64, 100, 160, 256])
def test_every_batch_fits_a_graph_with_bounded_padding(max_bs: int) -> None:
    sizes = batch_size_ladder(max_bs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_bs
    for bs in range(1, max_bs + 1):
        graph = next(s for s in sizes if s >= bs)
        assert graph - bs < max(8, bs // 4 + 1), (bs, graph)
