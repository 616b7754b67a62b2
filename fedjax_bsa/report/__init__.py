"""Reading runs back: the run summary's regime (:mod:`~fedjax_bsa.report.
regime`), the run files (:mod:`~fedjax_bsa.report.run_files`) and the
plots (:mod:`~fedjax_bsa.report.plot`, ``run_figures``).

May import every layer below :mod:`fedjax_bsa.run`.
"""
