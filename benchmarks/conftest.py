"""Options of the pytest-benchmark suite (``pytest benchmarks ...``); ``pytest tests`` never loads this file.

    pytest benchmarks --bench-device cpu --bench-shapes s1 --bench-sequences 256 --benchmark-autosave
    pytest benchmarks --bench-device cpu --bench-shapes s1 --bench-sequences 256 --benchmark-compare
"""
import os

# The Triton interpreter must be chosen before anything that defines a kernel is imported (docs/kernel_design.md);
# the value passes through unread, for Triton to read.
if "DYNAMIXER_BENCH_TRITON_INTERPRET" in os.environ:
    os.environ["TRITON_INTERPRET"] = os.environ["DYNAMIXER_BENCH_TRITON_INTERPRET"]


def pytest_addoption(parser):
    group = parser.getgroup("dynamixer-bench", "dynamic_mix benchmark cases (same meaning as dynamixer-bench)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if visible, else cpu)")
    group.addoption("--bench-dtype", default=None, help="float32, bfloat16, float16, float64 (default: as "
                                                        "dynamixer-bench)")
    group.addoption("--bench-shapes", default="all", help="space-separated named shapes (s1 s2 m1 m3 l1 l2) "
                                                          "and/or L,C,S,d (default: all named)")
    group.addoption("--bench-backends", default=None, help="space-separated backends (default: as dynamixer-bench)")
    group.addoption("--bench-images", type=int, default=None, help="images per call (N = images * L sequences; "
                                                                   "default: as dynamixer-bench)")
    group.addoption("--bench-sequences", type=int, default=None, help="sequences per call, instead of images")
    group.addoption("--bench-directions", default="fwd fwdbwd", help="space-separated: fwd bwd fwdbwd")
