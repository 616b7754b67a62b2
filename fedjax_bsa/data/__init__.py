"""Datasets, file loaders and client partitioners (host-side numpy)."""

from fedjax_bsa.data.datasets import Dataset
from fedjax_bsa.data.datasets import digits
from fedjax_bsa.data.datasets import mnist1d
from fedjax_bsa.data.datasets import synthetic
from fedjax_bsa.data.datasets import synthetic_params
from fedjax_bsa.data.datasets import SyntheticParams
from fedjax_bsa.data.loaders import DataFileError
from fedjax_bsa.data.loaders import load_cifar10
from fedjax_bsa.data.loaders import load_leaf
from fedjax_bsa.data.loaders import load_npz
from fedjax_bsa.data.partition import dirichlet
from fedjax_bsa.data.partition import format_summary
from fedjax_bsa.data.partition import iid
from fedjax_bsa.data.partition import natural
from fedjax_bsa.data.partition import quantity
from fedjax_bsa.data.partition import QUANTITY_METHODS
from fedjax_bsa.data.partition import shards
from fedjax_bsa.data.partition import summarize
from fedjax_bsa.data.vocab import encode_text
from fedjax_bsa.data.vocab import NUM_CHAR_CLASSES
from fedjax_bsa.data.vocab import SHAKESPEARE_VOCAB
