"""``python -m fedjax_bsa.bench.noise_estimator``."""

import sys

from fedjax_bsa.bench.noise_estimator.main import main

sys.exit(main())
