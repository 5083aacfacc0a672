"""MNIST and Fashion-MNIST from their original IDX gzip files.

Expected layout, with ``root`` from the argument or ``BILEVEL_DATA``::

    <root>/MNIST/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/FashionMNIST/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

References:
    LeCun, Bottou, Bengio & Haffner (1998), "Gradient-based learning applied to document
    recognition". Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a novel image dataset for
    benchmarking machine learning algorithms", arXiv:1708.07747.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from bilevel.data._files import cure_error, damaged, download_file, md5sum
from bilevel.data.root import DATA_ENV, resolve_root

__all__ = [
    "MNIST_FILES",
    "MNIST_KINDS",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "load_mnist",
    "mnist_folder",
    "read_idx",
    "verify_mnist",
]

#: Data set names, which are also the folder names under the data root.
MNIST_KINDS = ("MNIST", "FashionMNIST")

#: (images file, labels file) of each split.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
"""Official md5 sums of the eight gzip files: ``{data set: {file name: md5}}``."""

#: Public mirrors used by ``download=True``, tried in order.
MNIST_MIRRORS = {
    "MNIST": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: the most a deflate stream expands (1,032 to 1 in theory), with a margin
_MAX_DEFLATE_RATIO = 1100
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, by its ``.gz`` suffix).

    The header is big-endian: a 4-byte magic number (two zero bytes, a type code, the
    number of dimensions), then one 4-byte size per dimension, then the data. A header that
    claims more data than the file can hold (deflate expands at most about 1,032-fold) is
    refused before the data is read.

    Args:
        path: The IDX file.
        expected_magic: If given, the magic number the file must have (2051 for MNIST
            images, 2049 for labels).

    Returns:
        The array, in native byte order, with the shape given by the header.

    Raises:
        ValueError: If the magic number is wrong, the data length does not match the
            sizes in the header, or a ``.gz`` file is truncated or corrupt.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_at_most(f, 4)
            if len(head) < 4:
                raise ValueError(f"{path}: not an IDX file (only {len(head)} bytes)")
            (magic,) = struct.unpack(">I", head)
            if expected_magic is not None and magic != expected_magic:
                raise ValueError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
            zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
            if zero != 0 or code not in _IDX_DTYPES:
                raise ValueError(f"{path}: bad IDX magic number {magic:#010x}")
            sizes = _read_at_most(f, 4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", sizes)
            dtype = _IDX_DTYPES[code]
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            stored = os.fstat(f.fileno()).st_size
            if expected > stored * (_MAX_DEFLATE_RATIO if opener is gzip.open else 1):
                raise _not_the_file(
                    path,
                    f"its header gives shape {shape} ({expected} bytes of data), more than "
                    f"its {stored} bytes can hold",
                )
            # one byte more than the header announces, no more: a small gzip file can expand
            # to gigabytes, which are reported without being held in memory
            data = _read_at_most(f, expected + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise cure_error(
            ValueError,
            "{path}: cannot decompress it ({kind}: {exc}); the file is truncated or corrupt "
            "(e.g. a download cut short). Delete it and download it again ({download}: it "
            "fetches missing files and checks their md5).",
            path=path,
            kind=type(exc).__name__,
            exc=exc,
        ) from exc
    if len(data) != expected:
        held = f"more than {expected}" if len(data) > expected else f"only {len(data)}"
        raise ValueError(
            f"{path}: IDX header gives shape {shape} ({expected} bytes of data), "
            f"but the file holds {held} bytes of data"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_at_most(f: BinaryIO, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``f`` (fewer at its end), read in blocks into one growing
    buffer: the memory taken follows the bytes the file holds, not the sizes its header
    claims, and is not doubled by joining the blocks at the end."""
    data = bytearray()
    while len(data) < limit:
        block = f.read(min(limit - len(data), 1 << 24))
        if not block:
            break
        data += block
    return data


def _not_the_file(path: Path, what: str) -> ValueError:
    """The error for a data file that is damaged or not the one named."""
    return damaged(path, what, "the file its name says")


def _check_kind(kind: str) -> None:
    if kind not in MNIST_KINDS:
        raise ValueError(f"kind must be one of {MNIST_KINDS}, got {kind!r}")


def mnist_folder(root: str | os.PathLike[str] | None = None, kind: str = "MNIST") -> Path:
    """Return the folder that holds one data set's gzip files: ``<root>/<kind>``.

    Args:
        root: Data folder; ``None`` reads ``BILEVEL_DATA``.
        kind: ``"MNIST"`` or ``"FashionMNIST"``.

    Returns:
        The folder (it may not exist).
    """
    _check_kind(kind)
    return resolve_root(root) / kind


def verify_mnist(root: str | os.PathLike[str] | None = None, kind: str = "MNIST") -> None:
    """Check the four gzip files of a data set against the official md5 sums.

    Args:
        root: Data folder; ``None`` reads ``BILEVEL_DATA``.
        kind: ``"MNIST"`` or ``"FashionMNIST"``.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file's md5 differs from the official one.
    """
    folder = mnist_folder(root, kind)
    _require_files(folder, kind, list(MNIST_MD5[kind]))
    cure = "Delete them, and load_mnist(..., download=True) fetches them again."
    _check_md5(kind, folder, list(MNIST_MD5[kind]), cure)


def _check_md5(kind: str, folder: Path, names: list[str], cure: str) -> None:
    """Raise if one of the files ``names`` in ``folder`` differs from the official release
    (``cure``: the sentence that says what to do, in :func:`cure_error`'s template form)."""
    bad = [
        f"{name}: md5 {got}, expected {MNIST_MD5[kind][name]}"
        for name in names
        if (got := md5sum(folder / name)) != MNIST_MD5[kind][name]
    ]
    if not bad:
        return
    raise cure_error(
        ValueError,
        "{kind} files in {folder} differ from the official release:\n  {bad}\nThey are "
        "damaged or not {kind}'s (another data set's files under this name?). " + cure,
        kind=kind,
        folder=folder,
        bad="\n  ".join(bad),
    )


def _require_files(folder: Path, kind: str, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise cure_error(
            FileNotFoundError,
            "{kind} files missing from {folder}: {missing}. Expected the original gzip files "
            "{files} in that folder; {download} to fetch them, or {pass_root} or set {env} to "
            "the folder that holds {kind}/",
            kind=kind,
            folder=folder,
            missing=", ".join(missing),
            files=", ".join(MNIST_MD5[kind]),
            env=DATA_ENV,
        )


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    split: Literal["train", "test"] = "train",
    kind: Literal["MNIST", "FashionMNIST"] = "MNIST",
    download: bool = False,
    check_md5: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST from the original IDX gzip files.

    Images are returned as ``uint8`` in ``[0, 255]`` (0 = background), exactly as stored;
    use ``images.float() / 255`` for floats in ``[0, 1]``.

    Args:
        root: Data folder holding ``MNIST/`` and ``FashionMNIST/``; ``None`` reads the
            ``BILEVEL_DATA`` environment variable.
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).
        kind: ``"MNIST"`` or ``"FashionMNIST"``.
        download: If true and files are missing, download them from the public mirror
            (``MNIST_MIRRORS``) into ``<root>/<kind>/`` and check their md5.
        check_md5: Check the two files read against the official md5 sums first (about
            15 ms for MNIST's training set, 40 ms for Fashion-MNIST's), so that another data
            set's files, or damaged ones, under these names are refused rather than loaded;
            false takes files of one's own.

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``[N, 28, 28]`` and ``int64`` tensor ``[N]``
        with values in ``0..9``.

    Raises:
        FileNotFoundError: If files are missing and ``download`` is false.
        ValueError: On a bad argument, a malformed file, or an md5 mismatch.
    """
    _check_kind(kind)
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = mnist_folder(root, kind)
    names = list(MNIST_FILES[split])
    if download:
        for name in names:
            if not (folder / name).is_file():
                urls = [base + name for base in MNIST_MIRRORS[kind]]
                download_file(urls, folder / name, [MNIST_MD5[kind][name]])
    _require_files(folder, kind, names)
    if check_md5:
        cure = (
            "Delete them and download them again ({download}), or {no_check_md5} to use them "
            "as they are."
        )
        _check_md5(kind, folder, names, cure)
    images = read_idx(folder / names[0], _IMAGES_MAGIC)
    labels = read_idx(folder / names[1], _LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise _not_the_file(folder / names[0], f"its images are {images.shape[1:]}, not 28x28")
    if images.shape[0] != labels.shape[0]:
        raise _not_the_file(
            folder / names[1], f"it holds {labels.shape[0]} labels for {images.shape[0]} images"
        )
    if labels.size and labels.max() > 9:
        raise _not_the_file(folder / names[1], f"it holds label {labels.max()}, outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
