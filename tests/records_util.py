"""Comparison of metrics.jsonl records shared by the equality tests."""

import numpy as np


#: Keys that differ between equal runs: the host's clock, and the padding
#: efficiency of the kernel's lane pool, which a sweep shares between its
#: experiments (and which depends on the lanes, hence on the devices).
NOT_COMPARED = ("wall_time_s", "padding_efficiency")


def assert_records_close(a, b, skip=NOT_COMPARED):
  """Records ``a`` and ``b`` have the same rounds, keys and values (float32
  tolerance), except the keys in ``skip``."""
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if k in skip:
        continue
      if ra[k] is None or rb[k] is None:
        assert ra[k] == rb[k], k
      else:
        np.testing.assert_allclose(ra[k], rb[k], rtol=2e-4, atol=2e-5,
                                   err_msg=f"round {ra['round']} {k}")
