"""``python -m fedjax_bsa.bench.sweep``."""

import sys

from fedjax_bsa.bench.sweep.main import main

sys.exit(main())
