"""Benchmarks of fedjax_bsa, installed with it.

One subpackage per benchmark a user of the installed package runs, each
run as ``python -m fedjax_bsa.bench.<name>`` (its ``__main__``, which calls
``<name>/main.py``'s ``main``); the ``fedjax-bsa`` command offers three:

* :mod:`~fedjax_bsa.bench.kernel`: the round kernel against its baselines
  (``fedjax-bsa bench kernel``).
* :mod:`~fedjax_bsa.bench.sweep`: a packed sweep against separate runs
  (``fedjax-bsa bench sweep``).
* :mod:`~fedjax_bsa.bench.study`: the regime study (``fedjax-bsa study``).
* :mod:`~fedjax_bsa.bench.noise_estimator`: the kernel's noise estimates
  against exact per-example values.
* :mod:`~fedjax_bsa.bench.headroom_bound`: how large the batch lever's
  headroom can be.
* :mod:`~fedjax_bsa.bench.known_answer`: v3 on a problem with a known
  answer.

What they share is :mod:`~fedjax_bsa.bench.harness` (timing, the machine,
reports, where results go); a benchmark imports no other benchmark.
Scripts only the repository runs are in its ``benchmarks/`` folder, not
here, and nothing here imports FedJAX or Haiku (docs/design.md, section
11).
"""
