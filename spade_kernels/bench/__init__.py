"""The benchmark harness behind ``spade-kernels bench`` (docs/design.md, "Performance targets").

Measurement (:mod:`.measure`), sweeps (:mod:`.sweep`) and reports
(:mod:`.report`) are separate; :mod:`.cli` is the command line.  The
pytest-benchmark suite in ``benchmarks/`` times the same cases
(:func:`~.measure.make_case`).
"""

from .cli import add_arguments, main, run_from_args
from .measure import environment, estimate_bytes, make_case, measure, measure_in_subprocess
from .report import format_scaling_table, format_table, plot_results, write_results
from .sweep import BASELINES, CPU_SHAPES, GPU_SHAPES, MODES, QUICK_SHAPES, Row, parse_shape, run_sweep

__all__ = [
    "BASELINES",
    "CPU_SHAPES",
    "GPU_SHAPES",
    "MODES",
    "QUICK_SHAPES",
    "Row",
    "add_arguments",
    "environment",
    "estimate_bytes",
    "format_scaling_table",
    "format_table",
    "main",
    "make_case",
    "measure",
    "measure_in_subprocess",
    "parse_shape",
    "plot_results",
    "run_from_args",
    "run_sweep",
    "write_results",
]
