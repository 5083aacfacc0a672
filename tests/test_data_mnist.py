"""MNIST / Fashion-MNIST readers: real files (skipped without data) and synthetic IDX files."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.data import (
    MNIST_MD5,
    load_mnist,
    mnist,
    read_idx,
    resolve_root,
    reword,
    verify_mnist,
)
from bilevel.data._files import download_file, read_md5sums
from bilevel.data.mnist import MNIST_FILES

KINDS = ("MNIST", "FashionMNIST")
# (kind, split) -> (count, first five labels, per-class counts of labels 0..2)
EXPECTED = {
    ("MNIST", "train"): (60000, [5, 0, 4, 1, 9], [5923, 6742, 5958]),
    ("MNIST", "test"): (10000, [7, 2, 1, 0, 4], [980, 1135, 1032]),
    ("FashionMNIST", "train"): (60000, [9, 0, 0, 3, 0], [6000, 6000, 6000]),
    ("FashionMNIST", "test"): (10000, [9, 2, 1, 1, 6], [1000, 1000, 1000]),
}


@pytest.mark.parametrize(("kind", "split"), sorted(EXPECTED))
def test_load_real(data_root: Path, require_data, kind: str, split: str) -> None:
    require_data(data_root / kind)
    images, labels = load_mnist(data_root, split=split, kind=kind)
    count, first, per_class = EXPECTED[kind, split]
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert labels[:5].tolist() == first
    assert torch.bincount(labels, minlength=10)[:3].tolist() == per_class
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_md5_official(data_root: Path, require_data, kind: str) -> None:
    folder = require_data(data_root / kind)
    verify_mnist(data_root, kind)  # raises on a mismatch
    assert read_md5sums(folder / "MD5SUMS") == MNIST_MD5[kind]


def test_root_from_env(data_root: Path, require_data, monkeypatch: pytest.MonkeyPatch) -> None:
    require_data(data_root / "MNIST")
    monkeypatch.setenv("BILEVEL_DATA", str(data_root))
    _, labels = load_mnist(split="test")
    assert labels.shape == (10000,)


@pytest.mark.parametrize("env", [None, "", "  "])
def test_no_root(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    """Unset, empty or blank (it read a folder named "  " under the current one)."""
    if env is None:
        monkeypatch.delenv("BILEVEL_DATA", raising=False)
    else:
        monkeypatch.setenv("BILEVEL_DATA", env)
    with pytest.raises(ValueError, match=r"root=.*BILEVEL_DATA"):
        resolve_root(None)
    with pytest.raises(ValueError, match="BILEVEL_DATA"):
        load_mnist()


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    ndim_code = {np.uint8: 0x08}[array.dtype.type]
    magic = (ndim_code << 8) | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_folder(root: Path, n_images: int = 7, n_labels: int = 7) -> Path:
    folder = root / "MNIST"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_labels).astype(np.uint8)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    return folder


def test_synthetic_roundtrip(tmp_path: Path) -> None:
    folder = _fake_folder(tmp_path)
    # synthetic files: they are not the official ones, which the default md5 check refuses
    with pytest.raises(ValueError, match=r"(?s)md5 .*, expected 9fb629c4189551a2d022fa330f9573f3"):
        load_mnist(tmp_path, split="test")
    images, labels = load_mnist(tmp_path, split="test", check_md5=False)
    assert images.shape == (7, 28, 28)
    assert np.array_equal(images.numpy(), read_idx(folder / "t10k-images-idx3-ubyte.gz"))
    assert labels.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz"):
        verify_mnist(tmp_path, "MNIST")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="differ from the official release"):
        verify_mnist(tmp_path, "MNIST")


def test_uncompressed_idx(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", array)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), array)


def test_bad_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path / "a.gz", np.zeros((2, 28, 28), np.uint8), magic=2049)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx(tmp_path / "a.gz", expected_magic=2051)
    (tmp_path / "b.idx").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(tmp_path / "b.idx")


def test_truncated(tmp_path: Path) -> None:
    _write_idx(tmp_path / "a.idx", np.zeros((3, 28, 28), np.uint8))
    data = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="header gives shape"):
        read_idx(tmp_path / "a.idx")


def test_count_mismatch(tmp_path: Path) -> None:
    _fake_folder(tmp_path, n_images=7, n_labels=6)
    with pytest.raises(ValueError, match=r"6 labels for 7 images"):
        load_mnist(tmp_path, split="test", check_md5=False)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, split="train", kind="FashionMNIST")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "FashionMNIST") in message and "download=True" in message


def test_a_cure_can_be_named_in_a_command_lines_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaders' cures name their arguments ("pass download=True"), which a command line
    over them cannot act on: reword() names its options instead, the rest of the message as
    it is; a message without a cure is returned as is."""
    options = {
        "root": "--root",
        "pass_root": "give --root",
        "default_root": "leave --root out",
        "download": "add --download",
    }
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    expected = {  # what the library says, what the command line says instead
        lambda: load_mnist(tmp_path): ("pass download=True to fetch them", "add --download to"),
        lambda: resolve_root(None): ("pass root= or set the BILEVEL_DATA", "give --root or set"),
        lambda: resolve_root(" "): ("pass root=None to use", "--root is an empty path"),
    }
    for call, (library, script) in expected.items():
        with pytest.raises((OSError, ValueError)) as info:
            call()
        assert library in str(info.value)
        reworded = reword(info.value, options)
        assert script in reworded and "root=" not in reworded and "=True" not in reworded
    assert reword(ValueError("plain"), options) == "plain"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_mnist(tmp_path, kind="KMNIST")
    with pytest.raises(ValueError, match="split must be"):
        load_mnist(tmp_path, split="val")


def test_download_offline(
    data_root: Path, require_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download path, with the real files served from a file:// "mirror"."""

    source = require_data(data_root / "MNIST")
    monkeypatch.setitem(
        mnist.MNIST_MIRRORS, "MNIST", ("file:///nonexistent/", source.as_uri() + "/")
    )
    images, labels = load_mnist(tmp_path, split="test", download=True)
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [7, 2, 1]
    assert sorted(p.name for p in (tmp_path / "MNIST").iterdir()) == sorted(MNIST_FILES["test"])
    with pytest.raises(OSError, match=r"md5 .*expected one of \['0+'\]"):
        download_file([(source / "MD5SUMS").as_uri()], tmp_path / "x", ["0" * 32])
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == [tmp_path / "MNIST"]


def test_a_header_beyond_what_the_file_can_hold_is_refused_before_its_body_is_read(
    tmp_path: Path,
) -> None:
    """BUG (before the fix): the body was read up to the size the header claimed; a 100 KB
    gzip file claiming 10 million images and holding 100 MB of zeros took 200 MB before it
    was refused (a 600 KB one took 1.4 GB). Deflate expands at most about 1,032-fold."""
    folder = tmp_path / "MNIST"
    folder.mkdir()
    header = struct.pack(">IIII", 2051, 10_000_000, 28, 28)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(100):
            f.write(bytes(1 << 20))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"(?s)shape \(10000000, 28, 28\).*can hold.*download"):
            load_mnist(tmp_path, split="test", check_md5=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_the_md5_refusal_names_its_cures(tmp_path: Path) -> None:
    _fake_folder(tmp_path)
    with pytest.raises(ValueError) as info:
        load_mnist(tmp_path, split="test")
    message = str(info.value)
    assert "pass download=True" in message and "pass check_md5=False" in message


def test_files_of_ones_own_with_more_images_load_without_the_md5_check(tmp_path: Path) -> None:
    """``check_md5=False`` takes files of one's own, also larger than MNIST's split (a bound
    on the split's size, since replaced by what the file can hold, refused them and said to
    delete them)."""
    _fake_folder(tmp_path, n_images=10_001, n_labels=10_001)
    images, labels = load_mnist(tmp_path, split="test", check_md5=False)
    assert images.shape == (10_001, 28, 28) and labels.shape == (10_001,)


def test_verify_mnist_names_a_cure_it_can_act_on(tmp_path: Path) -> None:
    """verify_mnist takes no download or check_md5 argument: its message named them."""
    folder = _fake_folder(tmp_path)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError) as info:
        verify_mnist(tmp_path, "MNIST")
    message = str(info.value)
    assert "load_mnist(..., download=True)" in message
    assert "pass download=True" not in message and "check_md5" not in message
