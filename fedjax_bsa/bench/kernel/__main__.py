"""``python -m fedjax_bsa.bench.kernel``."""

import sys

from fedjax_bsa.bench.kernel.main import main

sys.exit(main())
