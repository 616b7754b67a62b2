"""How large the batch lever's headroom can be (``python -m
fedjax_bsa.bench.headroom_bound``); all of it in
:mod:`~fedjax_bsa.bench.headroom_bound.main`.
"""
