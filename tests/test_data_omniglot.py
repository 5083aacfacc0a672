"""Omniglot reader, cache and character split.

Tests on the real data use the session fixture ``omniglot`` (decoded once, then cached);
the reader's edge cases use a small synthetic release.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bilevel.data import SPLIT_SIZES, Omniglot, omniglot_split_indices
from bilevel.data import omniglot as om

# sha256 of the newline-joined character names of each split (stability of the protocol)
SPLIT_SHA256 = {
    "train": "a4ee839ccfe3a85bef5ec5385a7392734efc40911f79a30996663ab393d5bade",
    "val": "dcfafb4d6abcb6207a6209ba9bc6dcbac6fb39d0409a5a4eed71234ea15f1551",
    "test": "db7bf32271bd371ef58dd2702c910830dc807acc4cb5272e46028bef952fc14c",
}
SPLIT_EXAMPLES = {
    "train": ["Alphabet_of_the_Magi/character01", "ULOG/character26"],
    "val": ["Alphabet_of_the_Magi/character17", "ULOG/character17"],
    "test": ["Alphabet_of_the_Magi/character02", "ULOG/character23"],
}


def test_counts(omniglot: Omniglot) -> None:
    assert len(omniglot) == 1623
    assert len(set(omniglot.alphabets)) == 50
    assert len(set(omniglot.names)) == 1623
    assert omniglot.images.shape == (1623, 20, 28, 28)
    assert omniglot.drawings.shape == (1623, 20)
    parts = Counter(omniglot.parts)
    assert parts == {"images_background": 964, "images_evaluation": 659}
    background = {
        a
        for a, p in zip(omniglot.alphabets, omniglot.parts, strict=True)
        if p == "images_background"
    }
    assert len(background) == 30


def test_canonical_order(omniglot: Omniglot) -> None:
    keys = [
        (p, a, c)
        for p, a, c in zip(omniglot.parts, omniglot.alphabets, omniglot.characters, strict=True)
    ]
    assert keys == sorted(keys)
    assert omniglot.names[0] == "Alphabet_of_the_Magi/character01"
    for stems in omniglot.drawings[::97]:
        assert [s.split("_")[1] for s in stems] == [f"{i:02d}" for i in range(1, 21)]
        assert len({s.split("_")[0] for s in stems}) == 1


def test_pixels(omniglot: Omniglot) -> None:
    images = omniglot.images
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    # strokes are bright on a dark background: mostly zeros, borders empty
    assert 0.04 < images.mean() / 255 < 0.15
    assert images[:, :, 0, :].mean() < 5 and images[:, :, :, -1].mean() < 5
    assert (images.reshape(len(images) * 20, -1).max(axis=1) > 128).all()  # no empty image
    # identical to the original release, pixel for pixel
    assert omniglot.pixel_sha256 == om.OMNIGLOT_PIXEL_SHA256


def test_braille_duplicate(omniglot: Omniglot) -> None:
    """Known quirk: two drawings of Braille/character01 are pixel-identical."""
    i = omniglot.names.index("Braille/character01")
    stems = list(omniglot.drawings[i])
    a, b = stems.index("0192_03"), stems.index("0192_19")
    assert np.array_equal(omniglot.images[i, a], omniglot.images[i, b])


def test_md5_known(data_root: Path, require_data) -> None:
    folder = require_data(data_root / "omniglot")
    for part, sums in om.OMNIGLOT_MD5.items():
        if (folder / f"{part}.zip").is_file():
            assert om.md5sum(folder / f"{part}.zip") in sums


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_stable(omniglot: Omniglot, split: str) -> None:
    index = omniglot.split_indices(split)
    names = [omniglot.names[i] for i in index]
    assert len(names) == SPLIT_SIZES[split]
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == SPLIT_SHA256[split]
    assert names[0] == SPLIT_EXAMPLES[split][0] and names[-1] == SPLIT_EXAMPLES[split][1]
    # depends on the names only, not on their order
    shuffled = list(omniglot.names)
    np.random.default_rng(1).shuffle(shuffled)
    again = omniglot_split_indices(shuffled, split)
    assert sorted(shuffled[i] for i in again) == sorted(names)


def test_splits_disjoint(omniglot: Omniglot) -> None:
    index = {s: set(omniglot.split_indices(s).tolist()) for s in SPLIT_SIZES}
    assert sum(map(len, index.values())) == 1623
    assert set.union(*index.values()) == set(range(1623))
    assert not index["train"] & index["val"] and not index["train"] & index["test"]
    assert not index["val"] & index["test"]


def test_split_rotations(omniglot: Omniglot) -> None:
    split = omniglot.split("val")
    assert split.images.shape == (400, 20, 28, 28) and len(split) == 400
    assert len(set(split.class_names)) == 400
    base = omniglot.images[omniglot.split_indices("val")]
    for r in range(4):
        assert np.array_equal(split.images[r::4], np.rot90(base, r, axes=(-2, -1)))
    assert split.rotation[:5].tolist() == [0, 90, 180, 270, 0]
    assert split.class_names[1].endswith("/rot090")
    assert np.array_equal(split.character_index[::4], omniglot.split_indices("val"))
    plain = omniglot.split("test", rotations=False)
    assert plain.images.shape == (423, 20, 28, 28)
    assert np.array_equal(plain.images, omniglot.images[omniglot.split_indices("test")])
    with pytest.raises(ValueError, match="split must be one of"):
        omniglot.split("validation")


def test_cached_load(omniglot: Omniglot, data_root: Path, data_cache_dir: Path) -> None:
    assert omniglot.cache_path is not None and omniglot.cache_path.is_file()
    assert omniglot.cache_path.parent == data_cache_dir
    assert omniglot.cache_path.name.startswith("omniglot-28px-lanczos-")
    start = time.perf_counter()
    again = Omniglot(data_root, cache_dir=data_cache_dir, progress=False)
    elapsed = time.perf_counter() - start
    assert again.cache_path == omniglot.cache_path
    assert np.array_equal(again.images, omniglot.images) and again.names == omniglot.names
    assert elapsed < 5, f"cached load took {elapsed:.1f} s"
    assert not list(data_cache_dir.glob("*.tmp"))


# --- synthetic releases -------------------------------------------------------------------


def _png(rng: np.random.Generator) -> bytes:
    pixels = np.ones((105, 105), dtype=bool)
    r, c = rng.integers(10, 90, 2)
    pixels[r : r + 12, c : c + 8] = False  # a black stroke on white
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _synthetic(root: Path, as_zip: bool, n_drawings: int = 20) -> Path:
    """Two alphabets x two characters per part, written as zips or extracted folders."""
    rng = np.random.default_rng(0)
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    for p, part in enumerate(om.OMNIGLOT_PARTS):
        files = {}
        for a in range(2):
            for c in range(1, 3):
                for d in range(1, n_drawings + 1):
                    name = f"{part}/Script_{p}{a}/character{c:02d}/{p}{a}{c:02d}_{d:02d}.png"
                    files[name] = _png(rng)
        if as_zip:
            with zipfile.ZipFile(folder / f"{part}.zip", "w") as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
    return folder


def _sources(folder: Path) -> list:
    return [om._find_source(folder, part, False, False) for part in om.OMNIGLOT_PARTS]


def test_zip_and_folder_agree(tmp_path: Path) -> None:
    zipped = _synthetic(tmp_path / "z", as_zip=True)
    unzipped = _synthetic(tmp_path / "d", as_zip=False)
    a = om._decode_sources(_sources(zipped), 28, "lanczos", 0, False)
    b = om._decode_sources(_sources(unzipped), 28, "lanczos", 2, False)
    assert a["images"].shape == (8, 20, 28, 28)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert a["alphabets"].tolist()[:3] == ["Script_00", "Script_00", "Script_01"]
    # strokes bright after inversion, background 0
    assert a["images"][:, :, 0, 0].max() == 0 and a["images"].max() > 200
    full = om._decode_sources(_sources(zipped), 105, "lanczos", 0, False)
    assert set(np.unique(full["images"]).tolist()) == {0, 255}


def test_incomplete_data(tmp_path: Path) -> None:
    _synthetic(tmp_path, as_zip=True)
    with pytest.raises(ValueError, match="found 8 characters in 4 alphabets"):
        Omniglot(tmp_path, cache_dir=tmp_path / "cache", check_md5=False, progress=False)
    assert not (tmp_path / "cache").exists()  # nothing cached for bad data


def test_wrong_drawing_count(tmp_path: Path) -> None:
    folder = _synthetic(tmp_path, as_zip=False, n_drawings=3)
    with pytest.raises(ValueError, match="has 3 drawings, expected 20"):
        om._decode_sources(_sources(folder), 28, "lanczos", 0, False)


def test_unknown_md5(tmp_path: Path) -> None:
    """The cure of a download cut short is named first (it offered check_md5=False alone,
    whose next error then said to download again)."""
    _synthetic(tmp_path, as_zip=True)
    pattern = r"md5 .* is not one of the known sums.*Delete it and download it again"
    with pytest.raises(ValueError, match=pattern + r".*pass download=True.*check_md5=False"):
        Omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_fingerprint_changes(tmp_path: Path) -> None:
    folder = _synthetic(tmp_path, as_zip=False)
    cache = tmp_path / "cache"
    before = om._cache_path(cache, _sources(folder), 28, "lanczos")
    assert before == om._cache_path(cache, _sources(folder), 28, "lanczos")
    assert before != om._cache_path(cache, _sources(folder), 32, "lanczos")
    assert before != om._cache_path(cache, _sources(folder), 28, "bilinear")
    png = next((folder / "images_evaluation").rglob("*.png"))
    png.write_bytes(png.read_bytes() + b"\0")
    assert before != om._cache_path(cache, _sources(folder), 28, "lanczos")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "omniglot") in message
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert "download=True" in message


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(tmp_path, image_size=0)
    with pytest.raises(ValueError, match=r"image_size must be an int in 1\.\.1024, got True"):
        Omniglot(tmp_path, image_size=True)  # (a bool is an int: it failed in the decode)
    with pytest.raises(ValueError, match="resample must be one of"):
        Omniglot(tmp_path, resample="cubic")


def _cache_arrays(size: int = 2) -> dict[str, np.ndarray]:
    """The arrays a decode of all of Omniglot writes to its cache, with blank images."""
    n, d = om.N_CHARACTERS, om.N_DRAWINGS
    alphabets = [f"Alphabet_{i % om.N_ALPHABETS:02d}" for i in range(n)]
    return {
        "images": np.zeros((n, d, size, size), np.uint8),
        "parts": np.array([om.OMNIGLOT_PARTS[i % 2] for i in range(n)]),
        "alphabets": np.array(alphabets),
        "characters": np.array([f"character{i:04d}" for i in range(n)]),
        "drawings": np.array([[f"{i:04d}_{j:02d}" for j in range(d)] for i in range(n)]),
        "pixel_sha256": np.array(om.OMNIGLOT_PIXEL_SHA256),
    }


def test_cache_write(tmp_path: Path) -> None:
    arrays = _cache_arrays()
    path = tmp_path / "c" / "x.npz"
    assert om._save_cache(path, arrays)
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]
    assert np.array_equal(om._load_cache(path)["images"], arrays["images"])
    # unwritable cache folder (a file in the way): warn, no exception
    (tmp_path / "file").write_text("")
    with pytest.warns(RuntimeWarning, match="could not write the Omniglot cache"):
        assert not om._save_cache(tmp_path / "file" / "x.npz", arrays)
    # a corrupt cache is ignored with a warning
    path.write_bytes(b"not a zip")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable cache"):
        assert om._load_cache(path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert om._load_cache(tmp_path / "missing.npz") is None


def test_a_corrupt_zip_names_itself_and_the_cure(tmp_path: Path) -> None:
    """With check_md5=False (a zip of one's own), a truncated zip raised a bare BadZipFile."""
    folder = _synthetic(tmp_path, as_zip=True)
    damaged = folder / f"{om.OMNIGLOT_PARTS[0]}.zip"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 3])
    pattern = r"(?s)cannot read it as a zip archive.*download=True.*delete it and extract"
    with pytest.raises(ValueError, match=pattern + r".*as the folder images_\w+/ beside it"):
        om._decode_sources(_sources(folder), 28, "lanczos", 0, False)


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_an_oversized_drawing_is_refused_before_it_is_read(tmp_path: Path, as_zip: bool) -> None:
    """BUG (before the fix): each drawing was read whole into memory before its PNG header
    was checked, so a crafted or damaged archive whose member expands to gigabytes (a zip
    bomb: 64 MiB of zeros here, 64 KiB compressed) or a huge file in the extracted folder was
    read in full. A 105x105 drawing takes a few KiB; anything over 1 MiB is refused by the
    size the archive (or the file system) states, naming the file."""
    folder = _synthetic(tmp_path, as_zip=as_zip)
    part = om.OMNIGLOT_PARTS[0]
    name = f"{part}/Script_00/character01/0001_01.png"
    if as_zip:
        archive = folder / f"{part}.zip"
        _rewrite_zip_member(archive, name, bytes(64 << 20), zipfile.ZIP_DEFLATED)
        assert archive.stat().st_size < 1 << 20
    else:
        (folder / name).write_bytes(bytes(64 << 20))
    peak = _peak_memory_refusing(folder, r"(?s)0001_01\.png.*67108864 bytes.*download")
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held to refuse one drawing"


def _peak_memory_refusing(folder: Path, message: str) -> int:
    """The peak of Python's allocations (tracemalloc) while decoding ``folder`` in this
    process raises a ValueError matching ``message``."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            om._decode_sources(_sources(folder), 28, "lanczos", 0, False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_drawing_names_itself_and_the_cure(tmp_path: Path, workers: int) -> None:
    """BUG (before the fix): a drawing that is not a PNG raised PIL's bare
    ``UnidentifiedImageError``; with worker processes, that error (an ``OSError``) was taken
    for a failure of the pool: a warning that parallel decoding failed, and everything
    decoded again in this process, to the same bare error."""
    folder = _synthetic(tmp_path, as_zip=False)
    name = f"{om.OMNIGLOT_PARTS[0]}/Script_01/character02/0102_07.png"
    (folder / name).write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(ValueError, match=r"(?s)0102_07\.png is not a readable PNG.*download"):
            om._decode_sources(_sources(folder), 28, "lanczos", workers, False)


def _rewrite_zip_member(archive: Path, name: str, data: bytes, compress: int) -> None:
    """Write ``archive`` again with ``name``'s bytes replaced (and ``compress`` for all)."""
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = data
    with zipfile.ZipFile(archive, "w", compression=compress) as zf:
        for member, content in members.items():
            zf.writestr(member, content)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and header chunk claiming ``width x height`` pixels, then its end."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_zip_member_that_understates_its_size_is_not_inflated_whole(tmp_path: Path) -> None:
    """BUG (before the fix): the size check read the size the archive states; ``zf.read``
    then inflated the whole member before cutting it to that size, so a member stating 3,000
    bytes that inflates to 64 MiB held 64 MiB and more (at 256 MiB: a 558 MiB peak). Now at
    most 1 MiB of a drawing is read, whatever the archive says."""
    folder = _synthetic(tmp_path, as_zip=True)
    part = om.OMNIGLOT_PARTS[0]
    archive = folder / f"{part}.zip"
    name = f"{part}/Script_00/character01/0001_01.png"
    _rewrite_zip_member(archive, name, bytes(64 << 20), zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo(name).file_size == 64 << 20
    edited = bytearray(archive.read_bytes())  # the central directory's size, edited to 3,000
    at = edited.rindex(name.encode()) - 46  # the member's central directory record
    assert edited[at : at + 4] == b"PK\x01\x02"
    edited[at + 24 : at + 28] = (3000).to_bytes(4, "little")  # uncompressed size
    archive.write_bytes(bytes(edited))
    peak = _peak_memory_refusing(folder, r"(?s)0001_01\.png.*download")
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held to refuse one drawing"


def _damaged_deflate(archive: Path, name: str) -> None:
    """Make ``name``'s compressed data in ``archive`` start with a reserved deflate block
    type (a flipped bit in a download): inflating it fails before any CRC is checked."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    raw = bytearray(archive.read_bytes())
    local = info.header_offset
    start = local + 30 + int.from_bytes(raw[local + 26 : local + 28], "little")
    start += int.from_bytes(raw[local + 28 : local + 30], "little")
    raw[start] = 0xFF  # BFINAL 1, BTYPE 11: reserved
    archive.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["deflate", "bomb-header", "unreadable-file"])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_damaged_drawing_names_itself(tmp_path: Path, damage: str, workers: int) -> None:
    """BUG (before the fix): damage outside PIL's OSError escaped bare: a bit flipped in a
    deflated member (the real archives are deflated) raised ``zlib.error``; a PNG whose
    header claims 1e10 pixels PIL's ``DecompressionBombError``; and a drawing the user may
    not be read (an OSError: here a folder where the file should be) was taken by the worker
    pool for its own failure. Each now names the file, without the pool's fallback warning."""
    part = om.OMNIGLOT_PARTS[0]
    name = f"{part}/Script_01/character02/0102_07.png"
    folder = _synthetic(tmp_path, as_zip=damage != "unreadable-file")
    if damage == "deflate":
        archive = folder / f"{part}.zip"
        with zipfile.ZipFile(archive) as zf:
            drawing = zf.read(name)
        _rewrite_zip_member(archive, name, drawing, zipfile.ZIP_DEFLATED)
        _damaged_deflate(archive, name)
        expected = r"0102_07\.png is not a readable PNG.*download"
    elif damage == "bomb-header":
        _rewrite_zip_member(
            folder / f"{part}.zip", name, _png_header_only(100_000, 100_000), zipfile.ZIP_STORED
        )
        expected = r"0102_07\.png is not a readable PNG.*download"
    else:  # (a folder in a file's place is refused when the files are listed)
        (folder / name).unlink()
        (folder / name).mkdir()
        expected = r"0102_07\.png is not a regular file.*download"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(ValueError, match=f"(?s){expected}"):
            om._decode_sources(_sources(folder), 28, "lanczos", workers, False)


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a.update(drawings=np.arange(5)),
        lambda a: a.update(parts=np.arange(om.N_CHARACTERS)),
        lambda a: a.update(alphabets=a["alphabets"][:-1]),
        lambda a: a.update(pixel_sha256=np.array(["x", "y"])),
        lambda a: a.update(parts=np.array(["elsewhere"] * om.N_CHARACTERS)),
        lambda a: a.update(alphabets=np.array(["one"] * om.N_CHARACTERS)),
        lambda a: a.update({k: v[:-1] for k, v in a.items() if k != "pixel_sha256"}),
    ],
    ids=["drawings", "parts-dtype", "alphabets-short", "sha-shape", "parts", "one-alphabet", "n"],
)
def test_a_cache_that_a_decode_would_not_write_is_decoded_again(tmp_path: Path, change) -> None:
    """BUG (before the fix): only the images' shape and dtype were checked; a cache with
    1,622 consistent characters blamed the data folder ("the data is incomplete"), one
    alphabet short raised zip()'s error, and drawings of another shape loaded silently."""
    arrays = _cache_arrays()
    change(arrays)
    path = tmp_path / "x.npz"
    assert om._save_cache(path, arrays)
    with pytest.warns(RuntimeWarning, match="ignoring malformed cache .*decoded again"):
        assert om._load_cache(path, 2) is None
    assert om._save_cache(path, _cache_arrays())  # the arrays a decode writes: taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert om._load_cache(path, 2) is not None


def test_a_drawing_in_another_format_is_refused_without_running_a_program(
    tmp_path: Path, monkeypatch
) -> None:
    """BUG (before the fix): Pillow opened any format it knows; a drawing that is an EPS
    file had it run Ghostscript (``gs``, here a stand-in that leaves a marker) on it."""
    folder = _synthetic(tmp_path / "data", as_zip=False)
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 0\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    name = f"{om.OMNIGLOT_PARTS[0]}/Script_01/character02/0102_07.png"
    (folder / name).write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 105 105\n"
        b"newpath 0 0 moveto 105 105 lineto stroke\nshowpage\n%%EOF\n"
    )
    with pytest.raises(ValueError, match=r"(?s)0102_07\.png is not a readable PNG.*download"):
        om._decode_sources(_sources(folder), 28, "lanczos", 0, False)
    assert not marker.exists()


def test_a_named_pipe_among_the_drawings_is_refused_not_waited_on(tmp_path: Path) -> None:
    """BUG (before the fix): a named pipe named like a drawing blocked the load for good
    (listed as a drawing, then opened for reading). Refused when listed, and when read (one
    put in a drawing's place after the listing)."""
    folder = _synthetic(tmp_path, as_zip=False)
    name = f"{om.OMNIGLOT_PARTS[0]}/Script_01/character02/0102_07.png"
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(ValueError, match=r"(?s)0102_07\.png is not a regular file.*download"):
        _sources(folder)
    with pytest.raises(ValueError, match=r"(?s)0102_07\.png is not a regular file.*download"):
        om._read_drawing(str(folder), None, name)


def test_a_name_that_is_not_utf8_is_refused_with_the_folder(tmp_path: Path) -> None:
    """BUG (before the fix): the folder's fingerprint raised a bare UnicodeEncodeError."""
    folder = _synthetic(tmp_path, as_zip=False)
    character = folder / om.OMNIGLOT_PARTS[0] / "Script_01" / "character02"
    (character / os.fsdecode(b"\xff_01.png")).write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)not UTF-8.*download"):
        _sources(folder)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_a_folder_in_a_drawings_place_when_read_leaks_no_file_descriptor(tmp_path: Path) -> None:
    """BUG (before the fix): a folder put in a drawing's place after the listing was opened
    and refused, and its file descriptor left open, one per read."""
    (tmp_path / "p" / "a" / "c" / "x.png").mkdir(parents=True)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ValueError, match=r"x\.png is not a regular file"):
            om._read_drawing(str(tmp_path), None, "p/a/c/x.png")
    assert len(os.listdir("/proc/self/fd")) == before
