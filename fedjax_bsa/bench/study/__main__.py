"""``python -m fedjax_bsa.bench.study``."""

import sys

from fedjax_bsa.bench.study.main import main

sys.exit(main())
