"""The noise-estimator check (``python -m
fedjax_bsa.bench.noise_estimator``): the round kernel's gradient-noise
estimates against exact per-example values on digits.

* :mod:`~fedjax_bsa.bench.noise_estimator.main`: the command and its
  report (what is compared, and how).
* :mod:`~fedjax_bsa.bench.noise_estimator.problem`: the settings, clients,
  trained model and exact values.
* :mod:`~fedjax_bsa.bench.noise_estimator.rounds`: the kernel's rounds and
  their recomputation on the host.
* :mod:`~fedjax_bsa.bench.noise_estimator.stats`: standard errors and
  acceptance.
"""
