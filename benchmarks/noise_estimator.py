"""``python -m benchmarks.noise_estimator [...]``: the estimator against
exact per-example values.

A thin entry point kept for running from the repository; the benchmark is
:mod:`fedjax_bsa.bench.noise_estimator`.
"""

import sys

from fedjax_bsa.bench.noise_estimator import main

if __name__ == "__main__":
  sys.exit(main())
