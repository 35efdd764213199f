"""mmtune.eval"""

# The benchmark scorers add themselves to mmtune.eval.metrics.SCORERS on import (no cycle: they build on metrics).
import mmtune.eval.bench_metrics  # noqa: E402,F401
