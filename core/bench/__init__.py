"""The benchmark harness: backends compared on the model alone and end to end.

* :mod:`.harness` — configuration, environment record and the run (``avatar bench``);
* :mod:`.model` — model-only timing of one backend (feeds, latency statistics, memory);
* :mod:`.e2e` — end-to-end renders through :func:`avatar.render.render`;
* :mod:`.report` — JSON, Markdown and the chart.
"""

from .harness import (
    MODES,
    REFERENCE_BACKEND,
    SCHEMA,
    BenchConfig,
    bench_cache,
    cpu_model,
    default_batch_sizes,
    default_name,
    environment,
    hardware_label,
    load_average,
    run_bench,
    summarize,
    usable_backends,
    usable_cores,
    write_reports,
)

__all__ = [
    "MODES",
    "REFERENCE_BACKEND",
    "SCHEMA",
    "BenchConfig",
    "bench_cache",
    "cpu_model",
    "default_batch_sizes",
    "default_name",
    "environment",
    "hardware_label",
    "load_average",
    "run_bench",
    "summarize",
    "usable_backends",
    "usable_cores",
    "write_reports",
]
