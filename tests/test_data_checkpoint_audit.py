"""Audit of bilevel.data and bilevel.checkpoint: silent wrong results, unsafe behaviour and
unclear failures, checked on small synthetic files (the real data is never needed here).

Data: IDX/gzip files decoded against a hand-written reference, damaged or inconsistent files
give an error that names them, the data folder from the argument or ``BILEVEL_DATA``,
Omniglot decoding aligned with its file names (chunks and worker processes), the character
split and its rotations, the decoded cache (a damaged or mismatched cache is never used), and
the task sampler's seeds. Checkpoints: pickle payloads never run, a damaged file is detected,
a checkpoint of another problem is refused with the cure and leaves the problem as it was,
an interrupted save keeps the previous checkpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bilevel import BilevelProblem, checkpoint
from bilevel.checkpoint import CheckpointError
from bilevel.data import (
    SPLIT_SIZES,
    Omniglot,
    TaskSampler,
    load_mnist,
    omniglot_split_indices,
    read_idx,
    resolve_root,
)
from bilevel.data import omniglot as om
from bilevel.ll import GradientDescent
from bilevel.ul import Reverse

DTYPE = torch.float64


# --- MNIST: IDX / gzip files ---------------------------------------------------------------


def _idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + payload


def _mnist_folder(root: Path, images: bytes, labels: bytes, split: str = "test") -> Path:
    folder = root / "MNIST"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return folder


def test_mnist_values_and_labels_match_a_hand_decoded_reference(tmp_path: Path) -> None:
    """Pixels written byte by byte in row-major order: image i, row r, column c holds
    (31 i + 7 r + 3 c) mod 256; labels 3, 1, 4, 1, 5. Nothing transposed, shifted or scaled."""
    n = 5
    pixels = bytes(
        (31 * i + 7 * r + 3 * c) % 256 for i in range(n) for r in range(28) for c in range(28)
    )
    labels = [3, 1, 4, 1, 5]
    for split in ("test", "train"):
        _mnist_folder(
            tmp_path,
            _idx_bytes(2051, (n, 28, 28), pixels),
            _idx_bytes(2049, (n,), bytes(labels)),
            split,
        )
        images, y = load_mnist(tmp_path, split=split, check_md5=False)
        assert images.dtype == torch.uint8 and images.shape == (n, 28, 28)
        assert y.dtype == torch.int64 and y.tolist() == labels
        for i, r, c in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (2, 5, 27), (4, 27, 3), (3, 13, 14)]:
            assert images[i, r, c].item() == (31 * i + 7 * r + 3 * c) % 256, (i, r, c)
        i, r, c = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
        assert np.array_equal(images.numpy(), ((31 * i + 7 * r + 3 * c) % 256).astype(np.uint8))


def test_mnist_inconsistent_files_give_clear_errors(tmp_path: Path) -> None:
    zeros = bytes(2 * 28 * 28)
    cases = [  # (images file, labels file, message)
        (
            _idx_bytes(2051, (2, 28, 27), bytes(2 * 28 * 27)),
            _idx_bytes(2049, (2,), bytes(2)),
            "28x28",
        ),
        (
            _idx_bytes(2051, (2, 28, 28), zeros),
            _idx_bytes(2049, (2,), bytes([3, 10])),
            "label 10, outside 0..9",
        ),
        (
            _idx_bytes(2051, (2, 28, 28), zeros),
            _idx_bytes(2050, (2, 1), bytes(2)),
            "2050, expected 2049",
        ),
        (_idx_bytes(2049, (1568,), zeros), _idx_bytes(2049, (2,), bytes(2)), "2049, expected 2051"),
        (
            _idx_bytes(2051, (2, 28, 28), zeros + b"\0"),
            _idx_bytes(2049, (2,), bytes(2)),
            "header gives shape",
        ),
    ]
    for k, (images, labels, message) in enumerate(cases):
        root = tmp_path / str(k)
        _mnist_folder(root, images, labels)
        with pytest.raises(ValueError, match=message):
            load_mnist(root, split="test", check_md5=False)


def _gzip_damages() -> dict[str, bytes]:
    raw = _idx_bytes(2051, (2, 28, 28), bytes(range(256)) * 6 + bytes(32))
    good = gzip.compress(raw)
    return {
        "truncated gzip": good[: len(good) // 2],
        "crc mismatch": good[:-8] + bytes([good[-8] ^ 1]) + good[-7:],
        "bad deflate block": good[:10] + b"\xff" + good[11:],  # reserved block type 3
        "not gzip": b"<html>404 Not Found</html>",
    }


@pytest.mark.parametrize("damage", sorted(_gzip_damages()))
def test_a_damaged_gzip_file_names_itself_and_the_cure(tmp_path: Path, damage: str) -> None:
    """BUG (before the fix): gzip's EOFError / BadGzipFile / zlib.error came out bare, naming
    neither the file nor the cure (download it again)."""
    folder = _mnist_folder(tmp_path, b"", _idx_bytes(2049, (2,), bytes(2)))
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(_gzip_damages()[damage])
    with pytest.raises(ValueError) as error:
        load_mnist(tmp_path, split="test", check_md5=False)
    message = str(error.value)
    assert str(bad) in message and "corrupt" in message and "download" in message


def test_idx_sizes_whose_product_overflows_are_refused_by_the_size_check(tmp_path: Path) -> None:
    """BUG (before the fix): the data size was np.prod in int64, which wraps: sizes
    65536^4 = 2^64 gave 0 expected bytes, so a file with no data passed the size check and
    failed later inside NumPy ('cannot reshape array of size 0'), without naming the file."""
    path = tmp_path / "huge.idx"
    path.write_bytes(_idx_bytes(0x0804, (65536,) * 4, b""))
    with pytest.raises(ValueError, match="header gives shape") as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_data_root_argument_environment_and_missing_folder(tmp_path: Path, monkeypatch) -> None:
    env_root, arg_root = tmp_path / "env", tmp_path / "arg"
    _mnist_folder(
        env_root, _idx_bytes(2051, (1, 28, 28), bytes(784)), _idx_bytes(2049, (1,), bytes([7]))
    )
    monkeypatch.setenv("BILEVEL_DATA", str(env_root))
    assert resolve_root() == env_root.absolute() and resolve_root(arg_root) == arg_root
    assert load_mnist(split="test", check_md5=False)[1].tolist() == [7]  # from the environment
    # the argument wins over the environment; its missing folder is named with the cure
    with pytest.raises(FileNotFoundError) as error:
        load_mnist(arg_root, split="test", check_md5=False)
    message = str(error.value)
    assert str(arg_root / "MNIST") in message and "BILEVEL_DATA" in message
    assert "download=True" in message and "t10k-images-idx3-ubyte.gz" in message
    with pytest.raises(FileNotFoundError, match="download=True") as error:
        Omniglot(arg_root, cache_dir=tmp_path / "cache", progress=False)
    assert str(arg_root / "omniglot") in str(error.value)
    monkeypatch.delenv("BILEVEL_DATA")
    with pytest.raises(ValueError, match="BILEVEL_DATA"):
        load_mnist(split="test", check_md5=False)


# --- Omniglot: decoding, split, rotations, cache -------------------------------------------


def _strokes(rng: np.random.Generator) -> np.ndarray:
    """A 105x105 one-bit drawing (True = white background) with a few random strokes."""
    pixels = np.ones((105, 105), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(0, 95, 2)
        h, w = rng.integers(2, 10, 2)
        pixels[r : r + h, c : c + w] = False
    return pixels


def _synthetic_release(folder: Path) -> dict[str, np.ndarray]:
    """Extracted folders, 2 alphabets x 3 characters per part, distinct drawings; returns
    the one-bit pixels of every file by its name ``part/alphabet/character/stem``."""
    rng = np.random.default_rng(1)
    pixels = {}
    for p, part in enumerate(om.OMNIGLOT_PARTS):
        for a in range(2):
            for c in (1, 2, 10):  # character10 sorts after character02 (two digits)
                where = folder / part / f"Alpha_{p}{a}" / f"character{c:02d}"
                where.mkdir(parents=True)
                for d in rng.permutation(20):  # written in a shuffled order
                    stem = f"{p}{a}{c:02d}_{d + 1:02d}"
                    image = _strokes(rng)
                    Image.fromarray(image).save(where / f"{stem}.png")
                    pixels[f"{part}/Alpha_{p}{a}/character{c:02d}/{stem}"] = image
    return pixels


def test_omniglot_decoding_matches_pillow_and_keeps_names_aligned(tmp_path, monkeypatch) -> None:
    """Every decoded image is the inverted file it is named after (at 105 px exactly
    255 * stroke; at 28 px Pillow's LANCZOS of the grey image), across decoding chunks (7
    images each here) and worker processes."""
    folder = tmp_path / "omniglot"
    pixels = _synthetic_release(folder)
    sources = [om._find_source(folder, part, False, False) for part in om.OMNIGLOT_PARTS]
    monkeypatch.setattr(om, "_CHUNK", 7)
    full = om._decode_sources(sources, 105, "lanczos", 2, False)
    small = om._decode_sources(sources, 28, "lanczos", 0, False)
    assert full["images"].shape == (12, 20, 105, 105) and small["images"].shape == (12, 20, 28, 28)
    assert full["alphabets"].tolist()[:3] == ["Alpha_00"] * 3
    assert full["characters"].tolist()[:3] == ["character01", "character02", "character10"]
    bits = []
    for k in range(12):
        for d in range(20):
            name = "/".join(
                [
                    full["parts"][k],
                    full["alphabets"][k],
                    full["characters"][k],
                    full["drawings"][k, d],
                ]
            )
            one_bit = pixels[name]
            assert np.array_equal(full["images"][k, d], 255 * (~one_bit).astype(np.uint8)), name
            grey = Image.fromarray(one_bit).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
            assert np.array_equal(small["images"][k, d], 255 - np.asarray(grey)), name
            bits.append(np.packbits(one_bit))
            assert d == 0 or full["drawings"][k, d] > full["drawings"][k, d - 1]
    assert str(full["pixel_sha256"]) == hashlib.sha256(np.stack(bits).tobytes()).hexdigest()


def _names() -> list[str]:
    return [f"Alphabet_{i // 40:02d}/character{i % 40 + 1:02d}" for i in range(om.N_CHARACTERS)]


def test_split_is_deterministic_disjoint_and_independent_of_order() -> None:
    names = _names()
    splits = {s: omniglot_split_indices(names, s) for s in SPLIT_SIZES}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1100, "val": 100, "test": 423}
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(om.N_CHARACTERS))  # disjoint, complete
    for s, index in splits.items():
        assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
        assert np.array_equal(index, omniglot_split_indices(list(names), s))  # deterministic
        # the split is a function of the names, not of their order
        order = np.random.default_rng(5).permutation(len(names))
        shuffled = [names[i] for i in order]
        again = {shuffled[i] for i in omniglot_split_indices(shuffled, s)}
        assert again == {names[i] for i in index}
    other = omniglot_split_indices(names, "test", seed=1)
    assert not np.array_equal(other, splits["test"])


def test_split_rotations_are_counterclockwise_as_documented() -> None:
    """Class 4 j + r is character j of the split rotated by 90 r degrees counterclockwise:
    a mark in the top-right corner goes to the top-left (90), bottom-left (180) and
    bottom-right (270) corners."""
    data = object.__new__(Omniglot)
    data.names = _names()
    images = np.zeros((om.N_CHARACTERS, 20, 4, 4), dtype=np.uint8)
    images[:, :, 0, 3] = 255  # top-right mark
    images[:, :, 1, 1] = np.arange(om.N_CHARACTERS)[:, None] % 251  # which character
    data.images = images
    split = data.split("val")
    index = omniglot_split_indices(data.names, "val")
    assert split.images.shape == (400, 20, 4, 4) and split.images.flags.c_contiguous
    corners = {0: (0, -1), 90: (0, 0), 180: (-1, 0), 270: (-1, -1)}
    for j, character in enumerate(index):
        for r in range(4):
            cls = 4 * j + r
            image = split.images[cls, 0]
            assert split.character_index[cls] == character and split.rotation[cls] == 90 * r
            assert split.class_names[cls] == f"{data.names[character]}/rot{90 * r:03d}"
            expected = np.rot90(images[character], r, axes=(-2, -1))
            assert np.array_equal(split.images[cls], expected)
            row, col = corners[90 * r]
            assert image[row, col] == 255 and image.sum() == 255 + character % 251
    plain = data.split("val", rotations=False)
    assert np.array_equal(plain.images, images[index]) and plain.rotation.tolist() == [0] * 100


def _npz_arrays(n: int, size: int) -> dict[str, np.ndarray]:
    images = np.zeros((n, 20, size, size), dtype=np.uint8)
    images[..., size // 3 : size // 2, 1:-1] = 255
    return {
        "images": images,
        "parts": np.array(["images_background"] * n),
        "alphabets": np.array([f"Alphabet_{i % 50:02d}" for i in range(n)]),
        "characters": np.array([f"character{i // 50 + 1:02d}" for i in range(n)]),
        "drawings": np.array([[f"{i:04d}_{d + 1:02d}" for d in range(20)] for i in range(n)]),
        "pixel_sha256": np.array(om.OMNIGLOT_PIXEL_SHA256),
    }


def _corrupt_deflate(path: Path, member: str) -> None:
    """Set the first byte of a member's deflate stream to 0xff: block type 3 (reserved)."""
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo(member)
    assert info.compress_type == zipfile.ZIP_DEFLATED
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len] = 0xFF
    path.write_bytes(bytes(data))


def test_a_cache_with_a_damaged_compressed_stream_is_ignored_with_a_warning(tmp_path) -> None:
    """BUG (before the fix): a damaged deflate stream raised zlib.error out of Omniglot(),
    naming neither the cache file nor the cure; a damaged cache is to be ignored (and
    rebuilt) with a warning, as an unreadable one is."""
    path = tmp_path / "omniglot-28px-lanczos-0000.npz"
    assert om._save_cache(path, _npz_arrays(3, 28))
    _corrupt_deflate(path, "images.npy")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable cache"):
        assert om._load_cache(path) is None


def test_a_cache_of_another_image_size_is_not_used(tmp_path) -> None:
    """BUG (before the fix): the cache's images were not checked against image_size, so a
    cache file holding 10x10 images under the 28 px name (renamed, copied, written by a
    faulty version) was used silently: Omniglot(image_size=28).images was [..., 10, 10].
    Here the cache is ignored with a warning; the sources (8 characters) are then decoded,
    which stops at the character count."""
    folder = tmp_path / "data" / "omniglot"
    _synthetic_release(folder)
    sources = [om._find_source(folder, part, False, False) for part in om.OMNIGLOT_PARTS]
    cache = om._cache_path(tmp_path / "cache", sources, 28, "lanczos")
    assert om._save_cache(cache, _npz_arrays(om.N_CHARACTERS, 10))
    with pytest.warns(RuntimeWarning, match="ignoring malformed cache"):
        with pytest.raises(ValueError, match="found 12 characters"):
            Omniglot(tmp_path / "data", cache_dir=tmp_path / "cache", num_workers=0, progress=False)


# --- task sampler --------------------------------------------------------------------------


def test_seeds_beyond_32_bits_do_not_repeat_the_tasks_of_other_seeds() -> None:
    """BUG (before the fix): tasks were drawn with default_rng([seed, index]); NumPy splits
    each integer into 32-bit words and pads short entropy with zeros, so seed 2**32 + s,
    task 0 was exactly seed s, task 1 (and seed s + k 2**32, task 0 was seed s, task k)."""
    images = np.random.default_rng(0).integers(0, 256, (40, 10, 3, 3), dtype=np.uint8)
    small = [TaskSampler(images, 5, 2, 3, seed=s) for s in (0, 7)]
    for s, base in zip((0, 7), small, strict=True):
        big = TaskSampler(images, 5, 2, 3, seed=2**32 + s)
        for k in range(1, 4):
            for index in range(3):
                a, b = big.task_indices(index), base.task_indices(k)
                assert not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])), (s, k)
        assert big.task_indices(0)[0].tolist() == big.task_indices(0)[0].tolist()
    # unchanged for 32-bit seeds and indices: a pinned task of seed 0
    c, e = small[0].task_indices(3)
    rng = np.random.default_rng([0, 3])
    assert np.array_equal(c, rng.choice(40, 5, replace=False))
    assert np.array_equal(e, np.argsort(rng.random((5, 10)), axis=1, kind="stable")[:, :5])


# --- checkpoints ---------------------------------------------------------------------------


class ScalarL2(nn.Module):
    """UL model: one L2 weight ``exp(log_l2)`` (its shape does not depend on the LL's)."""

    def __init__(self, value: float = 0.3) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor([value], dtype=DTYPE).log())


class Weights(nn.Module):
    """LL model: ``x @ <name>``."""

    def __init__(self, d: int, name: str = "w", dtype: torch.dtype = DTYPE) -> None:
        super().__init__()
        self.name = name
        setattr(self, name, nn.Parameter(torch.zeros(d, dtype=dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ getattr(self, self.name)


def _ll_loss(state: dict) -> torch.Tensor:
    w = next(iter(state["ll_model"].parameters()))
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean() + 0.5 * state["ul_model"].log_l2.exp().sum() * (w * w).sum()


def _ul_loss(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def _problem(d: int = 3, l2: float = 0.3, name: str = "w", dtype=DTYPE) -> BilevelProblem:
    ul, ll = ScalarL2(l2).to(dtype), Weights(d, name, dtype)
    lower = GradientDescent(_ll_loss, ll, ul, lr=0.1, iters=3)
    upper = Reverse(_ul_loss, ul, _ll_loss, ll)
    return BilevelProblem(lower, upper, torch.optim.SGD(ul.parameters(), lr=0.1))


def _data(d: int = 3, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, d, generator=g, dtype=dtype)
    return (x, x.sum(1)), (x[:4], x[:4].sum(1))


def _saved(tmp_path: Path, **options) -> Path:
    """A checkpoint after 2 UL steps of ``_problem(l2=2.0, **options)``."""
    problem = _problem(l2=2.0, **options)
    train, val = _data(options.get("d", 3), options.get("dtype", DTYPE))
    for _ in range(2):
        problem.step(train, val)
    path = tmp_path / "checkpoint.pt"
    problem.save_checkpoint(path)
    return path


def _untouched(problem: BilevelProblem) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for t in (*problem.ul.ul_model.parameters(), *problem.ll.ll_model.parameters())
    ]


def _assert_unchanged(problem: BilevelProblem, before: list[torch.Tensor]) -> None:
    assert problem.step_count == 0 and problem.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(_untouched(problem), before, strict=True))
    assert not problem.ul_optimizer.state_dict()["state"]


class OpensMarker:
    """Unpickling this opens ``marker`` for writing (creating it): what a crafted file would
    do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def pwned(tmp_path_factory) -> Path:
    """Where a crafted payload would write if it ran: a fresh folder of this test's own (a
    fixed path was shared by every run on the machine)."""
    return tmp_path_factory.mktemp("payload") / "pwned"


def _replace_member(path: Path, suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, content in members:
            zf.writestr(info, data if info.filename.endswith(suffix) else content)


def test_pickle_payloads_are_refused_and_never_run(tmp_path: Path, pwned: Path) -> None:
    # 1. a complete current-format checkpoint with the payload inside the UL model's weights
    path = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    state["ul_model"]["log_l2"] = OpensMarker(pwned)
    torch.save(state, tmp_path / "nested.pt")
    # 2. a valid checkpoint's archive whose data.pkl is replaced by a bare payload pickle
    (tmp_path / "swapped.pt").write_bytes(path.read_bytes())
    _replace_member(tmp_path / "swapped.pt", "/data.pkl", pickle_payload(pwned))
    for name in ("nested.pt", "swapped.pt"):
        with pytest.raises(CheckpointError, match="cannot be loaded safely") as error:
            _problem().load_checkpoint(tmp_path / name)
        assert name in str(error.value) and "open" in str(error.value)
        assert not pwned.exists(), f"loading {name} ran its code"
        # the control: the payload is real
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(tmp_path / name, weights_only=False)
        assert pwned.exists()
        pwned.unlink()


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"step": 1, "ul_model": OpensMarker(marker)}, protocol=2)


def _flip(path: Path, member_suffix: str, offset: int) -> None:
    data = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(member_suffix))
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_detected(tmp_path: Path) -> None:
    """BUG (before the fix): torch's reader does not check the archive's CRC-32, so one
    flipped bit in a tensor loaded silently: w[500] = 500 came back as 500.0000152587891 and
    a run would resume from it."""
    path = tmp_path / "checkpoint.pt"
    w = torch.arange(1000, dtype=DTYPE)
    checkpoint.save(path, {"w": w})
    assert torch.equal(checkpoint.load(path)["w"], w)
    _flip(path, "/data/0", 8 * 500 + 3)
    assert zipfile.ZipFile(path).testzip() is not None  # the archive knows it is damaged
    with pytest.raises(CheckpointError, match=r"corrupted|damaged") as error:
        checkpoint.load(path)
    assert str(path) in str(error.value) and "Restore it from a copy" in str(error.value)


def _flip_header(path: Path, member_suffix: str, where: str) -> None:
    """One bit of a member's zip header: bit 1 of the high byte of the local header's name
    length, the MS-DOS folder attribute (0x10) of its central-directory record, or the
    encrypted flag (bit 0 of the general-purpose flags) there."""
    data = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(member_suffix))
    if where == "local name length":
        data[info.header_offset + 27] ^= 0x02
    else:
        record = data.find(b"PK\x01\x02" + data[info.header_offset + 4 : info.header_offset + 6])
        while record >= 0:
            name_len = struct.unpack("<H", data[record + 28 : record + 30])[0]
            if data[record + 46 : record + 46 + name_len].decode() == info.filename:
                break
            record = data.find(b"PK\x01\x02", record + 1)
        if where == "folder attribute":
            data[record + 38] ^= 0x10
        else:
            data[record + 8] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["local name length", "folder attribute", "encrypted flag"])
def test_a_flipped_bit_in_a_zip_header_is_detected(tmp_path: Path, where: str) -> None:
    """BUG (before the fix): Python's zipfile and torch's reader disagree on a damaged
    header, and only zipfile's reading was checked: a flipped bit in a local header's name
    length made torch read another tensor's bytes (zipfile raised a UnicodeDecodeError, taken
    for "not a zip"), a member marked as a folder loaded as uninitialized memory (zipfile
    ignores the attribute), and the encrypted flag gave torch's bare RuntimeError."""
    path = tmp_path / "checkpoint.pt"
    state = {"a": torch.arange(5, dtype=DTYPE), "b": torch.arange(5, 12, dtype=DTYPE)}
    checkpoint.save(path, state)
    _flip_header(path, "/data/1", where)
    with pytest.raises(CheckpointError, match=r"corrupted|damaged") as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)


def test_a_damaged_random_state_is_a_checkpoint_error_and_changes_nothing(tmp_path) -> None:
    """A generator state that torch refuses (a crafted file with valid CRCs) raised torch's
    bare RuntimeError ("Invalid mt19937 state") from load_checkpoint."""
    path = _saved(tmp_path)
    state = checkpoint.load(path)
    state["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    checkpoint.save(path, state)
    problem = _problem()
    before = _untouched(problem)
    with pytest.raises(CheckpointError, match="random-generator state is damaged"):
        problem.load_checkpoint(path)
    _assert_unchanged(problem, before)


@pytest.mark.parametrize(
    "other",
    [{"d": 4}, {"name": "v"}, {"dtype": torch.float32}],
    ids=["ll shape", "ll name", "dtype"],
)
def test_a_checkpoint_of_another_problem_is_refused_and_changes_nothing(tmp_path, other) -> None:
    """BUG (before the fix): only the UL parameters' shapes were compared; an LL model of
    another shape or parameter name got torch's bare RuntimeError after the UL weights had
    been overwritten (log_l2 took the checkpoint's value), and a float32 checkpoint loaded
    into a float64 problem was cast silently."""
    path = _saved(tmp_path, **other)
    problem = _problem()
    before = _untouched(problem)
    with pytest.raises(ValueError, match="ll_model") as error:
        problem.load_checkpoint(path)
    message = str(error.value)
    assert "start a new run" in message
    # strict=False is offered only where it loads (a dtype, cast): torch refuses the others
    assert ("strict=False" in message) == ("dtype" in other)
    _assert_unchanged(problem, before)
    same = _problem()
    same.load_checkpoint(_saved(tmp_path / "same"))  # the control: the same problem resumes
    assert same.step_count == 2 and same.ul.ul_model.log_l2.item() != before[0].item()


def _tampered(tmp_path: Path, change) -> Path:
    state = checkpoint.load(_saved(tmp_path))
    change(state)
    path = tmp_path / "tampered.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def _bad_rng(state: dict) -> None:
    state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _bad_step(state: dict) -> None:
    state["step"] = "five"


def _negative_step(state: dict) -> None:
    state["step"] = -3


@pytest.mark.parametrize("change", [_bad_rng, _bad_step, _negative_step], ids=lambda f: f.__name__)
def test_a_tampered_entry_is_refused_and_changes_nothing(tmp_path, change) -> None:
    """BUG (before the fix): the models and the step were restored one after the other; a
    damaged RNG state or a step that is not an int raised after the UL weights, the LL
    weights and the step had been overwritten, and step = -3 was accepted."""
    path = _tampered(tmp_path, change)
    problem = _problem()
    before = _untouched(problem)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        problem.load_checkpoint(path)
    _assert_unchanged(problem, before)


def test_a_checkpoint_without_settings_is_refused_under_strict(tmp_path) -> None:
    """BUG (before the fix): without a 'settings' entry the strict check was skipped, so a
    file holding another problem's weights (other method, LR, optimizer) resumed silently."""
    path = _tampered(tmp_path, lambda state: state.pop("settings"))
    problem = _problem()
    before = _untouched(problem)
    with pytest.raises(ValueError, match="settings") as error:
        problem.load_checkpoint(path)
    assert "strict=False" in str(error.value)
    _assert_unchanged(problem, before)
    problem.load_checkpoint(path, strict=False)  # asked for: loaded
    assert problem.step_count == 2


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = _saved(tmp_path)
    before = path.read_bytes()
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _problem().save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # a process killed in the middle of writing: the old file stands, the next save cleans up
    script = textwrap.dedent(
        f"""
        import os, torch
        from bilevel import checkpoint

        def killed(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os._exit(9)

        torch.save = killed
        checkpoint.save({str(path)!r}, {{"step": 99}})
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert run.returncode == 9, run.stderr.decode()
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 2
    assert len(list(tmp_path.glob("checkpoint.pt.*.tmp"))) == 1
    checkpoint.save(path, checkpoint.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_data_root_is_refused_not_read_as_the_current_folder(blank, monkeypatch):
    """``Path("")`` is the current folder: a blank ``--data-root "$DIR"`` (an unset shell
    variable) read whatever data lay in the working directory."""
    monkeypatch.setenv("BILEVEL_DATA", "/somewhere")
    with pytest.raises(ValueError, match="root is an empty path"):
        resolve_root(blank)
