"""Data sets and few-shot task sampling.

Data sets are read from a data folder given as ``root=`` or by the ``BILEVEL_DATA``
environment variable; derived caches go to ``cache_dir=``, ``BILEVEL_CACHE`` or
``~/.cache/bilevel``. The loaders' errors name the arguments that cure them
(``download=True``, ...); a command line over them names its own options with ``reword``.
"""

from bilevel.data._files import CURE_ARGUMENTS, md5sum, reword
from bilevel.data.mnist import MNIST_MD5, load_mnist, read_idx, verify_mnist
from bilevel.data.omniglot import (
    OMNIGLOT_MD5,
    SPLIT_SIZES,
    Omniglot,
    OmniglotSplit,
    omniglot_split_indices,
)
from bilevel.data.root import resolve_cache_dir, resolve_root
from bilevel.data.tasks import Task, TaskDataset, TaskSampler, collate_tasks, meta_batches

__all__ = [
    "CURE_ARGUMENTS",
    "MNIST_MD5",
    "OMNIGLOT_MD5",
    "SPLIT_SIZES",
    "Omniglot",
    "OmniglotSplit",
    "Task",
    "TaskDataset",
    "TaskSampler",
    "collate_tasks",
    "load_mnist",
    "md5sum",
    "meta_batches",
    "omniglot_split_indices",
    "read_idx",
    "resolve_cache_dir",
    "resolve_root",
    "reword",
    "verify_mnist",
]
