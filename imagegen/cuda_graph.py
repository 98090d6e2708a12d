"""A callable captured once as a CUDA graph, for timing GPU work without the host's launch overhead.

    graph = captured(fn, warmups=3)     # fn() warmed up on a side stream, then captured once
    graph.replay()                      # runs fn's kernels again, on the same memory
    graph = captured(repeated(fn, 10))  # ten calls back to back in one graph, as a training step replays them

Capture needs the calls warmed up off the default stream first (lazy initialisation, allocator pools), so
`warmups` calls run on a side stream before it. Used by imagegen.benchmark.graph_time_ms and by
imagegen.cublaslt to time candidate algorithms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def captured(fn: Callable[[], object], warmups: int = 1) -> torch.cuda.CUDAGraph:
    """fn() captured once in a CUDA graph, after `warmups` calls on a side stream (CUDA only)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def repeated(fn: Callable[[], object], times: int) -> Callable[[], list]:
    """A callable that calls fn() `times` times in a row (e.g. to capture several calls in one graph)."""
    return lambda: [fn() for _ in range(times)]
