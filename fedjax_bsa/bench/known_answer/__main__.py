"""``python -m fedjax_bsa.bench.known_answer``."""

import sys

from fedjax_bsa.bench.known_answer.main import main

sys.exit(main())
