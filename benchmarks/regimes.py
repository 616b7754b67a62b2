"""``python -m benchmarks.regimes [...]``: the regime study.

A thin entry point kept for running from the repository; the study is
:mod:`fedjax_bsa.bench.regimes_main` (``fedjax-bsa study``).
"""

import sys

from fedjax_bsa.bench.regimes_main import main

if __name__ == "__main__":
  sys.exit(main())
