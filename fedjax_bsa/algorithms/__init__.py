"""Federated algorithms as pure objects (see :mod:`.base`), registered by
name in :data:`fedjax_bsa.core.registry.ALGORITHMS`."""

from fedjax_bsa.algorithms import fedavg as _fedavg
from fedjax_bsa.algorithms import feddyn as _feddyn
from fedjax_bsa.algorithms import scaffold as _scaffold
from fedjax_bsa.algorithms.base import Algorithm
from fedjax_bsa.algorithms.base import client_optimizer
from fedjax_bsa.algorithms.base import example_weights
from fedjax_bsa.algorithms.base import fednova_a_norm
from fedjax_bsa.algorithms.base import RoundResult
from fedjax_bsa.algorithms.base import server_optimizer
from fedjax_bsa.algorithms.fedavg import fednova_weights
from fedjax_bsa.algorithms.scaffold import control_update as scaffold_update


def make_algorithm(cfg) -> Algorithm:
  """The configured algorithm (``cfg.algorithm`` looked up by name)."""
  from fedjax_bsa.core import registry  # pylint: disable=g-import-not-at-top
  return registry.ALGORITHMS.get(cfg.algorithm)(cfg)
