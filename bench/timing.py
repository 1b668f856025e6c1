"""Shared timing for the GPU benchmarks: medians from Triton's benchmarking helpers."""

from triton.testing import do_bench, do_bench_cudagraph


def median_ms(fn, graph: bool) -> float:
    """Median time of ``fn`` in ms: replayed from a CUDA graph (GPU time alone) or eager (launch overhead included).
    A path that cannot be captured in a graph gives NaN (reported as n/a)."""
    if graph:
        try:
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception:
            return float("nan")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")
