"""The character vocabulary of LEAF text data (Shakespeare).

:func:`encode_text` maps characters to ids with :data:`SHAKESPEARE_VOCAB`;
:func:`fedjax_bsa.data.loaders.load_leaf` uses it for text examples, and
:mod:`fedjax_bsa.data.loaders` re-exports everything here.
"""

from __future__ import annotations

import string

import numpy as np

__all__ = ["NUM_CHAR_CLASSES", "SHAKESPEARE_VOCAB", "encode_text"]

# Character vocabulary for LEAF text data (Shakespeare): Python's
# ``string.printable`` (digits, letters, punctuation, whitespace; 100 chars).
# Character ``SHAKESPEARE_VOCAB[i]`` maps to id ``i + 1``; id 0 is reserved for
# any character outside the vocabulary (e.g. non-ASCII). Hence 101 classes.
SHAKESPEARE_VOCAB = string.printable
_CHAR_TO_ID = {ch: i + 1 for i, ch in enumerate(SHAKESPEARE_VOCAB)}
NUM_CHAR_CLASSES = len(SHAKESPEARE_VOCAB) + 1


def encode_text(text: str) -> np.ndarray:
  """Maps characters to ids via :data:`SHAKESPEARE_VOCAB` (0 = unknown).

  Args:
    text: Any string.

  Returns:
    int32 ``[len(text)]`` ids in ``[0, NUM_CHAR_CLASSES)``.
  """
  return np.fromiter((_CHAR_TO_ID.get(ch, 0) for ch in text), np.int32,
                     count=len(text))
