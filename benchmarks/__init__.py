"""Entry points run from the repository (``python -m benchmarks.<name>``).

The benchmarks themselves live in :mod:`fedjax_bsa.bench` (``fedjax-bsa
bench kernel|sweep``, ``fedjax-bsa study``); this folder is not installed.
"""
