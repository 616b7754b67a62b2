"""``python -m fedjax_bsa.bench.headroom_bound``."""

import sys

from fedjax_bsa.bench.headroom_bound.main import main

sys.exit(main())
