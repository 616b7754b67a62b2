"""The lowest layer: the configuration, the registries and the types the
other layers share.

* :mod:`~fedjax_bsa.core.config`: :class:`Config`, its validation and the
  traced settings;
* :mod:`~fedjax_bsa.core.registry`: the named choices;
* :mod:`~fedjax_bsa.core.types`: :class:`Plan`, :class:`ClientStats`,
  :class:`Jobs`, :class:`Context`, :class:`Feedback`,
  :class:`Controller`, :class:`ClientResources`.

Imports nothing else of the package.
"""

from fedjax_bsa.core.config import Config
from fedjax_bsa.core.config import ConfigError
from fedjax_bsa.core.types import ClientResources
from fedjax_bsa.core.types import ClientStats
from fedjax_bsa.core.types import Context
from fedjax_bsa.core.types import Controller
from fedjax_bsa.core.types import Feedback
from fedjax_bsa.core.types import Jobs
from fedjax_bsa.core.types import Plan

__all__ = ["Config", "ConfigError", "ClientResources", "ClientStats",
           "Context", "Controller", "Feedback", "Jobs", "Plan"]
