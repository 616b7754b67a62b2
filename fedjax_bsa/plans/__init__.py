"""A round's plan: each cohort client's batch, learning rate and local
work, the deadline, and who is aggregated.

* :mod:`~fedjax_bsa.plans.round_plan`: :func:`plan_round`, the pipeline
  (controller -> deadline rule -> local work -> round policy) and the
  registered built-ins;
* :mod:`~fedjax_bsa.plans.controllers`: the controller contract, the
  simple controllers and :func:`~fedjax_bsa.plans.controllers.clamp`;
* :mod:`~fedjax_bsa.plans.noise_state`, :mod:`~fedjax_bsa.plans.goodput`,
  :mod:`~fedjax_bsa.plans.displacement`: the noise-driven controllers;
* :mod:`~fedjax_bsa.plans.deadline`, :mod:`~fedjax_bsa.plans.clock`: the
  deadline rules and the simulated clock.

May import :mod:`fedjax_bsa.core`, :mod:`fedjax_bsa.data` and
:mod:`fedjax_bsa.kernel`.
"""

from fedjax_bsa.plans.round_plan import decayed_lr
from fedjax_bsa.plans.round_plan import make_controller
from fedjax_bsa.plans.round_plan import plan_round
from fedjax_bsa.plans.round_plan import quantized
from fedjax_bsa.plans.round_plan import RoundPlan

__all__ = ["RoundPlan", "decayed_lr", "make_controller", "plan_round",
           "quantized"]
