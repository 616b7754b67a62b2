"""The sweep benchmark (``fedjax-bsa bench sweep``, ``python -m
fedjax_bsa.bench.sweep``): E experiments as one packed sweep against E
separate runs; all of it in :mod:`~fedjax_bsa.bench.sweep.main`.
"""
