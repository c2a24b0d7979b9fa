"""dynamixer-bench as a package: ``cli`` (options, defaults, the run and its JSON), ``op`` (shapes, work
conventions, providers and the op sweep), ``model`` (the network benchmark), ``timing`` (the one timing pipeline
both use), ``machine`` (roofline, hardware, versions) and ``report`` (table, plot, cell formats).

    dynamixer-bench --help            # or: python -m dynamixer_ops.bench --help
"""
from .cli import Console, build_parser, check_requirements, finish_args, main, parse_requirements
from .op import (BASELINES, DEFAULTS, DIRECTIONS, DTYPE_BY_NAME, Shape, check, make_closure, make_mix_fn,
                 parse_shape, resolve_backends, run_op_sweep, work)
from .model import MODELS, BenchError, run_model
from .report import fmt_number, fmt_speedup, fmt_spread, plot, print_table, table_rows
from .timing import time_side_by_side

__all__ = ["main", "build_parser", "finish_args", "parse_requirements", "check_requirements", "Console",
           "DEFAULTS", "DIRECTIONS", "DTYPE_BY_NAME", "BASELINES", "MODELS", "Shape", "parse_shape", "work",
           "make_mix_fn", "make_closure", "check", "resolve_backends", "run_op_sweep", "run_model",
           "BenchError", "time_side_by_side", "print_table", "table_rows", "plot", "fmt_number", "fmt_speedup",
           "fmt_spread"]
