"""The published device-class table behind the ``"tiers"`` profile.

:data:`DEFAULT_TIERS` is the tier table that
:func:`fedjax_bsa.setup.resources.make_resources` uses when ``profile="tiers"``
is given no ``tiers``; the constants are the published per-device measurements
it is derived from (``docs/devices.md`` says where each number comes from
and how it was converted). Everything here is re-exported by
:mod:`fedjax_bsa.setup.resources`.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TIERS", "FEMNIST_CNN_PARAMS", "FLASH_CLASS_WEIGHTS",
           "FLASH_FEMNIST_BATCH", "FLASH_FEMNIST_MS_PER_BATCH",
           "FLASH_MEDIAN_DOWN_KBPS", "FLASH_MEDIAN_UP_KBPS"]

# Published per-device measurements behind DEFAULT_TIERS (docs/devices.md
# says where each number comes from and how it was converted).
#
# FLASH (Yang et al., "Characterizing Impacts of Heterogeneity in Federated
# Learning upon Large-Scale Smartphone Data", WWW 2021), as shipped in its
# simulator (PKU-Chengxu/FLASH, models/utils/device_util/device_util.py) and
# reused by FedBalancer's simulator (Shin et al., MobiSys 2022): mean training
# time of one batch of 10 examples of the LEAF FEMNIST CNN (conv 5x5x32,
# conv 5x5x64, dense 2048, 62 classes) on its three device classes, slowest
# first, in milliseconds.
FLASH_FEMNIST_BATCH = 10
FLASH_FEMNIST_MS_PER_BATCH = (1642.0, 588.0, 179.0)
# The weights FLASH's simulator draws a device class with for a phone it
# cannot map to a class (``Device_Util.unknown``), slowest class first.
FLASH_CLASS_WEIGHTS = (18820, 16428, 159)
# Medians over the 19 per-user network records FLASH ships
# (models/speed_distri.json, "down_u"/"up_u" in KB/s with 1 KB = 1024 bytes).
FLASH_MEDIAN_DOWN_KBPS = 4317.628571428571
FLASH_MEDIAN_UP_KBPS = 3285.6857142857143
# Parameters of the LEAF FEMNIST CNN above (float32: 4 bytes each): the model
# the per-batch times were measured with; use it as the clock's model_bytes to
# keep the measured compute-to-communication ratio.
FEMNIST_CNN_PARAMS = 6_603_710

_MID = FLASH_FEMNIST_MS_PER_BATCH[1]

# Device classes from the measurements above. ``speed`` multiplies
# ``base_speed`` and ``overhead_scale`` multiplies the ``step_overhead``
# argument, both as the class's per-batch time relative to the middle class
# (the measurements have one batch size, so a class is modelled as uniformly
# slower or faster: overhead and per-example time scale together).
# ``memory_cap`` (examples) is assumed, not measured. ``bandwidth`` (download)
# and ``bandwidth_up`` are bytes/s, the same for every class (FLASH draws a
# phone's network independently of its device class). ``share`` is the
# fraction of clients in the class.
DEFAULT_TIERS = (
    {"name": "low", "device": "FLASH class 0 (slowest)",
     "share": FLASH_CLASS_WEIGHTS[0] / sum(FLASH_CLASS_WEIGHTS),
     "speed": _MID / FLASH_FEMNIST_MS_PER_BATCH[0],
     "overhead_scale": FLASH_FEMNIST_MS_PER_BATCH[0] / _MID,
     "memory_cap": 32, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
    {"name": "mid", "device": "FLASH class 1",
     "share": FLASH_CLASS_WEIGHTS[1] / sum(FLASH_CLASS_WEIGHTS),
     "speed": 1.0, "overhead_scale": 1.0,
     "memory_cap": 128, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
    {"name": "high", "device": "FLASH class 2 (fastest)",
     "share": FLASH_CLASS_WEIGHTS[2] / sum(FLASH_CLASS_WEIGHTS),
     "speed": _MID / FLASH_FEMNIST_MS_PER_BATCH[2],
     "overhead_scale": FLASH_FEMNIST_MS_PER_BATCH[2] / _MID,
     "memory_cap": 512, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
)
