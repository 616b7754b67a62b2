"""The round kernel: every client job of a round in one compiled update.

* :mod:`~fedjax_bsa.kernel.round_kernel`: :func:`make_round_kernel`, the
  jobs, their statistics, the rows a cohort needs;
* :mod:`~fedjax_bsa.kernel.lanes`: the lane loop's named pieces;
* :mod:`~fedjax_bsa.kernel.layout`: lanes, microbatch and slot width;
* :mod:`~fedjax_bsa.kernel.noise`: the finite-sample noise estimator;
* :mod:`~fedjax_bsa.kernel.reference`: the unpadded per-client loop the
  kernel is tested against.

May import :mod:`fedjax_bsa.core` and :mod:`fedjax_bsa.data` only.
"""

from fedjax_bsa.core.types import ClientStats
from fedjax_bsa.core.types import Jobs
from fedjax_bsa.kernel.round_kernel import cohort_rows
from fedjax_bsa.kernel.round_kernel import failed_jobs
from fedjax_bsa.kernel.round_kernel import make_round_kernel
from fedjax_bsa.kernel.round_kernel import RoundOutput

__all__ = ["ClientStats", "Jobs", "RoundOutput", "cohort_rows",
           "failed_jobs", "make_round_kernel"]
