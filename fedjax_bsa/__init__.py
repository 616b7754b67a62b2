"""fedjax_bsa: a vectorized federated-learning simulator with adaptive
per-client batch sizes.

The package is layered (``docs/design.md``, "Layers"): :mod:`~fedjax_bsa.
core` < :mod:`~fedjax_bsa.data`, :mod:`~fedjax_bsa.algorithms` <
:mod:`~fedjax_bsa.kernel` < :mod:`~fedjax_bsa.plans` <
:mod:`~fedjax_bsa.setup` < :mod:`~fedjax_bsa.report` < :mod:`~fedjax_bsa.
run` < :mod:`~fedjax_bsa.bench`; a folder imports only those below it.
Importing the package imports the modules whose built-in choices fill the
registries (algorithms, plans, the experiment's datasets, partitions,
models and device profiles).
"""

from fedjax_bsa import algorithms  # noqa: F401 (registers the built-ins)
from fedjax_bsa import plans  # noqa: F401 (registers the built-ins)
from fedjax_bsa.core.config import Config
from fedjax_bsa.core.config import ConfigError
from fedjax_bsa.core.types import ClientStats
from fedjax_bsa.core.types import Plan
from fedjax_bsa.kernel import make_round_kernel
from fedjax_bsa.setup import experiment  # noqa: F401 (registers the built-ins)

__version__ = "0.1.0"
