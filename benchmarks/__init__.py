"""What only the repository runs (``python -m benchmarks.<name>``): the
scale benchmark, the v3 divergence runs, the pilot's table, FedJAX's runner
(``fedjax_uniform.py``, run by path in FedJAX's own venv) and the GPU
script. This folder is not installed; the benchmarks a user of the package
runs are in :mod:`fedjax_bsa.bench` (``fedjax-bsa bench kernel|sweep``,
``fedjax-bsa study``, ``python -m fedjax_bsa.bench.<name>``).
"""
