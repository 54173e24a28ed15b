"""Data sets, downloads, augmentation and mini-batches (the application side of pyeqprop).

Start with :func:`load_dataset` (default ``'digits'``, shipped in scikit-learn), then
:func:`iterate_batches` to move a split to the device, and :func:`augment` /
:func:`normalize` on each batch. See :mod:`pyeqprop.data.datasets` for the table of data sets.
"""
from .augment import augment, crop, hflip, normalize, random_crop, random_hflip
from .batches import iterate_batches, num_batches
from .datasets import (
    DATASETS,
    DEFAULT_DATASET,
    DEFAULT_TEST_FRACTION,
    Dataset,
    data_root,
    load_dataset,
    packaged_file,
    stratified_split,
)
from .download import ChecksumError, CorruptArchiveError, DownloadError, download, md5_of

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DEFAULT_TEST_FRACTION",
    "Dataset",
    "load_dataset",
    "stratified_split",
    "data_root",
    "packaged_file",
    "download",
    "md5_of",
    "DownloadError",
    "ChecksumError",
    "CorruptArchiveError",
    "augment",
    "crop",
    "random_crop",
    "hflip",
    "random_hflip",
    "normalize",
    "iterate_batches",
    "num_batches",
]
