"""``python -m benchmarks.sweep [...]``: the sweep benchmark.

A thin entry point kept for running from the repository; the benchmark is
:mod:`fedjax_bsa.bench.sweep_bench` (``fedjax-bsa bench sweep``).
"""

import sys

from fedjax_bsa.bench.sweep_bench import main

if __name__ == "__main__":
  sys.exit(main())
