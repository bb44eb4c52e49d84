"""``bench``: our training, search and inference paths measured side by side with the reference way.

- ``settings``: what the figures depend on (``bench_settings``), the machine and the data both paths read
- ``reference``: the reference solutions' loop, re-implemented faithfully (only bench imports it)
- ``training``: throughput and accuracy parity, reference against ``build_and_fit`` as ``tune`` runs it
- ``ceiling``: matmul FLOP/s and each training step's share of it
- ``inference``: the ensemble pyfunc on PNG bytes against its members' raw forward passes
- ``search``: epochs to come within one point of the best, pruning against none
- ``memory``, ``compile`` (opt-in): a ``tune`` worker's peak RSS; ``torch.compile`` modes against eager
- ``report``: the table, the targets, the JSON line and the MLflow run; ``run``: ``run_bench``
"""

from .run import run_bench
from .settings import OPTIONAL_SECTIONS, SECTIONS, BenchSettings, OptInSettings, bench_settings

__all__ = ["run_bench", "bench_settings", "BenchSettings", "OptInSettings", "OPTIONAL_SECTIONS", "SECTIONS"]
