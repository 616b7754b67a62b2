"""Running experiments: the compiled round loop (:mod:`~fedjax_bsa.run.
simulate`), the host driver (``driver``), a run and a sweep (``runner``,
``sweep``), devices and hosts (``distributed``), checkpoints, outputs and
the layout search (``autotune``).

May import every layer below it.
"""
