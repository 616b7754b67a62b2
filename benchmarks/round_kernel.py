"""``python -m benchmarks.round_kernel [...]``: the round-kernel benchmark.

A thin entry point kept for running from the repository; the benchmark is
:mod:`fedjax_bsa.bench.kernel_main` (``fedjax-bsa bench kernel``).
"""

import sys

from fedjax_bsa.bench.kernel_main import main

if __name__ == "__main__":
  sys.exit(main())
