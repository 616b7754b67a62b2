"""fedjax_bsa: a vectorized federated-learning simulator with adaptive
per-client batch sizes."""

from fedjax_bsa.config import Config
from fedjax_bsa.config import ConfigError
from fedjax_bsa.kernel import ClientStats
from fedjax_bsa.controllers import Plan
from fedjax_bsa.kernel import make_round_kernel

__version__ = "0.1.0"
