"""Building an experiment: the model, the clients' devices and data.

* :mod:`~fedjax_bsa.setup.experiment`: a config to a ready experiment;
* :mod:`~fedjax_bsa.setup.models`: the registered models;
* :mod:`~fedjax_bsa.setup.resources` (with ``client_resources``,
  ``device_tiers``, ``fedscale_trace``): device profiles.

May import :mod:`fedjax_bsa.core`, :mod:`fedjax_bsa.data`,
:mod:`fedjax_bsa.algorithms`, :mod:`fedjax_bsa.kernel` and
:mod:`fedjax_bsa.plans`.
"""
