"""Wall-clock timing that is correct on CPU and CUDA (synchronises around the region)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(_time_ms(fn, device) for _ in range(repeats))


def paired_median_ms(
    fns: Sequence[Callable[[], object]], device: torch.device, repeats: int = 5, calls: int = 1
) -> list[float]:
    """Median milliseconds per call of each of ``fns``, sampled in alternation.

    Sample ``i`` of every function is taken one after the other, so clock or thermal drift
    affects them alike, and the order rotates from one round to the next (a, b, c; b, c,
    a; ...), so no function always runs first or right after a given other. Each sample
    times ``calls`` back-to-back calls and divides by ``calls``: with ``calls > 1`` the host
    work of one call overlaps the device work of the previous one, as in a model's loop
    over layers; with ``calls=1`` each call starts from an idle device and its host
    overhead counts in full.
    """
    for fn in fns:  # warm-up
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for offset in range(len(fns)):
            index = (round_ + offset) % len(fns)
            fn = fns[index]
            samples[index].append(_time_ms(lambda fn=fn: [fn() for _ in range(calls)], device) / calls)
    return [statistics.median(times) for times in samples]


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``fn()`` (CUDA events on a GPU, wall clock on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def cuda_graph_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn`` (GPU time, no launch overhead)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 50, repeats: int = 5) -> float:
    """Median host milliseconds per call: Python, checks and launches, not the device work.

    On a GPU each sample queues ``calls`` calls behind a sleep kernel long enough to
    cover them, so the host never waits for the device (``fn`` must not synchronise); on
    CPU it is the wall clock of the calls.
    """
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the calls below only queue
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - begin) / calls * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(samples)
