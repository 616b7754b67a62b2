"""``python -m benchmarks.time_to_accuracy [...]``: the time-to-accuracy
study.

A thin entry point kept for running from the repository; the study is
:mod:`fedjax_bsa.bench.study` (``fedjax-bsa study``).
"""

import sys

from fedjax_bsa.bench.study import main

if __name__ == "__main__":
  sys.exit(main())
