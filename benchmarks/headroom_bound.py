"""``python -m benchmarks.headroom_bound [...]``: how large the batch
lever's headroom can be at all (batch range x spread of noise scales and
devices).

A thin entry point kept for running from the repository; the analysis is
:mod:`fedjax_bsa.bench.headroom_bound`.
"""

import sys

from fedjax_bsa.bench.headroom_bound import main

if __name__ == "__main__":
  sys.exit(main())
