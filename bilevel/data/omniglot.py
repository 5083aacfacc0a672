"""Omniglot, read from the original release and cached as a decoded array.

Expected layout, with ``root`` from the argument or ``BILEVEL_DATA``::

    <root>/omniglot/images_background.zip   (or the extracted folder images_background/)
    <root>/omniglot/images_evaluation.zip   (or the extracted folder images_evaluation/)

Inside, ``images_background/<Alphabet>/characterNN/XXXX_YY.png``: 105x105 one-bit PNGs,
white background, black strokes. 50 alphabets (30 background + 20 evaluation), 1,623
characters, 20 drawings of each (32,460 images).

All images are decoded once (Pillow), resized, inverted so that strokes are bright, and
cached as an ``.npz`` file in a cache folder (never in the data folder, which may be
read-only). The cache file name encodes the image size, the resampling filter and a
fingerprint of the source files, so a changed source gets a fresh cache.

Reference:
    Lake, Salakhutdinov & Tenenbaum (2015), "Human-level concept learning through
    probabilistic program induction", Science 350(6266). https://github.com/brendenlake/omniglot
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bilevel.data._files import cure_error, damaged, download_file, md5sum
from bilevel.data.root import CACHE_ENV, DATA_ENV, resolve_cache_dir, resolve_root
from bilevel.user_warnings import warn_user

__all__ = [
    "N_ALPHABETS",
    "N_CHARACTERS",
    "N_DRAWINGS",
    "OMNIGLOT_MD5",
    "OMNIGLOT_PARTS",
    "OMNIGLOT_PIXEL_SHA256",
    "OMNIGLOT_URLS",
    "SPLIT_SEED",
    "SPLIT_SIZES",
    "Omniglot",
    "OmniglotSplit",
    "omniglot_split_indices",
]

#: The two archives of the original release, in canonical order.
OMNIGLOT_PARTS = ("images_background", "images_evaluation")

OMNIGLOT_MD5 = {
    "images_background": (
        "68d2efa1b9178cc56df9314c21c6e718",
        "149ad5977102431ac4c1a202616ddb6c",
    ),
    "images_evaluation": (
        "6b91aef0f799c5bb55b94e3f2daec811",
        "4b7da8cad29899f3e50f53208d03ac08",
    ),
}
"""Accepted md5 sums of the zips: the upstream release first, then a pixel-identical
repack without PNG timestamp chunks (as kept beside this project)."""

#: Upstream download locations (used by ``download=True``; only the upstream md5 is
#: accepted for a download).
OMNIGLOT_URLS = {
    part: f"https://github.com/brendenlake/omniglot/raw/master/python/{part}.zip"
    for part in OMNIGLOT_PARTS
}

#: SHA-256 over the 105x105 pixels of all 32,460 images, in canonical order (see
#: ``Omniglot.pixel_sha256``). Equal for the upstream zips, the repacked zips and the
#: extracted folders; a differing value triggers a warning.
OMNIGLOT_PIXEL_SHA256 = "449a842a386424cad053204db411f835789ed4dfc6f53b1cc472266df95505d9"

N_ALPHABETS = 50
N_CHARACTERS = 1623
N_DRAWINGS = 20

#: Seed of the character split (see ``omniglot_split_indices``).
SPLIT_SEED = 0
SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}
"""Characters per split: 1,100 + 100 = 1,200 meta-training characters and 423 for
meta-testing, as in Vinyals et al. (2016) and Finn et al. (2017)."""

_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
_ORIGINAL_SIZE = 105
_CACHE_VERSION = 1
_CHUNK = 512  # images per decoding job


@dataclass(frozen=True)
class _Source:
    part: str
    path: Path  # the zip file, or the folder that contains the part's folder
    is_zip: bool
    fingerprint: str


def _find_source(folder: Path, part: str, download: bool, check_md5: bool) -> _Source:
    zip_path = folder / f"{part}.zip"
    dir_path = folder / part
    if not zip_path.is_file() and not dir_path.is_dir() and download:
        download_file([OMNIGLOT_URLS[part]], zip_path, OMNIGLOT_MD5[part][:1])
    if zip_path.is_file():
        digest = md5sum(zip_path)
        if check_md5 and digest not in OMNIGLOT_MD5[part]:
            raise cure_error(
                ValueError,
                "{zip_path}: md5 {digest} is not one of the known sums {known}; the file may be "
                "corrupt (e.g. a download cut short) or a different release. Delete it and "
                "download it again ({download}), or {no_check_md5} to use it anyway",
                zip_path=zip_path,
                digest=digest,
                known=list(OMNIGLOT_MD5[part]),
            )
        return _Source(part, zip_path, True, "zip:" + digest)
    if dir_path.is_dir():
        return _Source(part, folder, False, "dir:" + _folder_fingerprint(folder, part))
    raise cure_error(
        FileNotFoundError,
        "Omniglot {part!r} not found in {folder}: expected {zip} or the extracted folder "
        "{part}/ ({part}/<Alphabet>/characterNN/XXXX_YY.png), for both {both}. Get them from "
        "https://github.com/brendenlake/omniglot (python/ folder), {download}, or {pass_root} "
        "or set {env} to the folder that holds omniglot/",
        part=part,
        folder=folder,
        zip=zip_path.name,
        both=" and ".join(p + ".zip" for p in OMNIGLOT_PARTS),
        env=DATA_ENV,
    )


def _walk_pngs(folder: Path, part: str) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every ``part/<a>/<c>/*.png`` under ``folder``. A
    ``.png`` that is not a regular file (a named pipe would block the read for good, a device
    would stream forever) and a name that is not UTF-8 (Omniglot's are) are refused."""
    out = []
    for alphabet in _entries(folder / part):
        if not alphabet.is_dir() or alphabet.name.startswith("."):
            continue
        for character in _entries(alphabet.path):
            if not character.is_dir() or character.name.startswith("."):
                continue
            for f in _entries(character.path):
                if f.name.endswith(".png") and not f.name.startswith("."):
                    rel = f"{part}/{alphabet.name}/{character.name}/{f.name}"
                    try:
                        rel.encode()
                    except UnicodeEncodeError:
                        name = rel.encode(errors="surrogateescape")
                        raise _damaged(f"the name {name!r} is not UTF-8", str(folder)) from None
                    if not f.is_file():
                        raise _damaged(f"{rel} is not a regular file", str(folder))
                    st = f.stat()
                    out.append((rel, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def _entries(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """The entries of a folder, its listing closed (whatever the caller then raises)."""
    with os.scandir(path) as entries:
        return list(entries)


def _folder_fingerprint(folder: Path, part: str) -> str:
    digest = hashlib.sha256()
    for rel, size, mtime in _walk_pngs(folder, part):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _list_members(source: _Source) -> list[str]:
    """Names ``part/<Alphabet>/<character>/<file>.png`` of a source, unsorted."""
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise cure_error(
                ValueError,
                "{path}: cannot read it as a zip archive ({error}); the file is truncated or "
                "corrupt (e.g. a download cut short). Delete it and download it again "
                "({download}), or delete it and extract a good copy of it as the folder "
                "{part}/ beside it (a zip there is read first).",
                path=source.path,
                error=error,
                part=source.part,
            ) from error
        out = []
        for name in names:
            pieces = name.split("/")
            if (
                len(pieces) == 4
                and pieces[0] == source.part
                and name.endswith(".png")
                and not any(p.startswith(".") for p in pieces)
            ):
                out.append(name)
        return out
    return [rel for rel, _, _ in _walk_pngs(source.path, source.part)]


# Zips opened by this process, keyed by (process id, path): a zip's central directory takes
# ~0.1 s to parse, so each process opens each zip once. The pid in the key keeps a forked
# worker from using a file object (and file offset) inherited from its parent.
_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    key = (os.getpid(), path)
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[key]


def _close_zips() -> None:
    for (pid, _), zf in list(_OPEN_ZIPS.items()):
        if pid == os.getpid():
            zf.close()
    _OPEN_ZIPS.clear()


def _decode_job(
    job: tuple[str, bool, list[str], int, str],
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a list of PNGs: (resized inverted uint8 images, packed original bits)."""
    path, is_zip, names, size, resample = job
    images = np.empty((len(names), size, size), dtype=np.uint8)
    bits = np.empty((len(names), (_ORIGINAL_SIZE * _ORIGINAL_SIZE + 7) // 8), dtype=np.uint8)
    zf = _open_zip(path) if is_zip else None
    for i, name in enumerate(names):
        data = _read_drawing(path, zf, name)
        try:
            # PNG only: Pillow would otherwise hand an EPS file to Ghostscript, a program
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if im.size != (_ORIGINAL_SIZE, _ORIGINAL_SIZE):
                    raise ValueError(f"{path}: {name} is {im.size}, expected 105x105")
                gray = im.convert("L")
        except (OSError, Image.DecompressionBombError) as error:  # not a PNG, cut short
            raise _damaged(f"{name} is not a readable PNG ({error})", path) from None
        bits[i] = np.packbits(np.asarray(gray) >= 128)
        if size != _ORIGINAL_SIZE:
            gray = gray.resize((size, size), _RESAMPLE[resample])
        images[i] = 255 - np.asarray(gray)
    return images, bits


#: the most bytes one drawing may take: a 105x105 PNG takes a few KiB
_MAX_DRAWING_BYTES = 1 << 20
#: how a drawing is opened: without blocking (on Unix) and as bytes (on Windows)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _damaged(what: str, path: str) -> ValueError:
    """The error for a drawing of the data at ``path`` that cannot be used (``what``)."""
    return damaged(
        path,
        what,
        "Omniglot's",
        ", or delete the zip and extract a good copy of it beside it (a zip is read first)",
    )


def _read_drawing(path: str, zf: zipfile.ZipFile | None, name: str) -> bytes:
    """The bytes of one drawing, from the zip ``zf`` or the folder ``path``. At most
    :data:`_MAX_DRAWING_BYTES` are read, whatever size the archive states (``zf.read`` would
    inflate a whole member that expands to gigabytes); a larger drawing, or a member whose
    data is damaged, is refused with its name."""
    limit = _MAX_DRAWING_BYTES
    if zf is None:
        try:
            # not blocking on a named pipe put in the file's place since the folder was listed
            fd = os.open(Path(path) / name, _READ_FLAGS)
            try:
                status = os.fstat(fd)
                regular = stat.S_ISREG(status.st_mode)  # (not a folder, a pipe, a device)
                data, size = os.read(fd, limit + 1) if regular else b"", status.st_size
            finally:
                os.close(fd)
            if not regular:
                raise _damaged(f"{name} is not a regular file", path)
        except OSError as error:  # a file removed, no permission
            raise ValueError(
                f"{path}: cannot read {name} ({error.strerror or error}). Check the file and "
                "its permissions, or extract a good copy of the data beside it."
            ) from None
    else:
        try:
            with zf.open(name) as member:
                data, size = member.read(limit + 1), zf.getinfo(name).file_size
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # bad CRC, deflate
            raise _damaged(f"{name} is not a readable PNG ({error})", path) from None
    if len(data) > limit:
        raise _damaged(
            f"{name} takes {max(size, len(data))} bytes, where a 105x105 drawing takes a few KiB",
            path,
        )
    return data


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, 8)


def _decode_all(
    jobs: list[tuple[str, bool, list[str], int, str]], num_workers: int, progress: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    total = sum(len(job[2]) for job in jobs)
    with tqdm(total=total, desc="Decoding Omniglot", unit="img", disable=not progress) as bar:
        if num_workers > 1:
            try:
                results = []
                with ProcessPoolExecutor(max_workers=num_workers) as pool:
                    for result in pool.map(_decode_job, jobs):
                        results.append(result)
                        bar.update(len(result[0]))
                return results
            except (BrokenProcessPool, OSError) as exc:
                warn_user(
                    f"parallel Omniglot decoding failed ({exc!r}); decoding in this process",
                    RuntimeWarning,
                )
                bar.reset()
        results = []
        try:
            for job in jobs:
                results.append(_decode_job(job))
                bar.update(len(job[2]))
        finally:
            _close_zips()
        return results


def omniglot_split_indices(
    names: Sequence[str], split: Literal["train", "val", "test"], seed: int = SPLIT_SEED
) -> np.ndarray:
    """Indices of the characters in one split of the fixed character split.

    Protocol: the character-level split of Vinyals et al. (2016), "Matching Networks for
    One Shot Learning", as implemented in the MAML code of Finn et al. (2017),
    "Model-Agnostic Meta-Learning": all 1,623 characters of both archives are shuffled
    with a fixed seed; the first 1,200 are for meta-training (here 1,100 ``"train"`` +
    100 ``"val"``), the other 423 are ``"test"``. Alphabets therefore overlap between
    splits, characters do not. The sizes match those works; the characters drawn do not
    (MAML's shuffle depends on file-system order, and torchmeta ships its own split
    files), so compare numbers across papers with that in mind.

    The shuffle is a sort by ``sha256(f"{seed}/{name}")``, so it depends only on the
    character names (``"<Alphabet>/characterNN"``), not on file-system order or on the
    NumPy version. Within a split, indices are returned in increasing order.

    Args:
        names: Character names in canonical order (``Omniglot.names``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: Shuffle seed; ``SPLIT_SEED`` (0) gives the split documented here.

    Returns:
        ``int64`` array of indices into ``names``.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
    if len(names) != N_CHARACTERS:
        raise ValueError(f"names must hold the {N_CHARACTERS} characters, got {len(names)}")
    keys = [hashlib.sha256(f"{seed}/{name}".encode()).hexdigest() for name in names]
    order = sorted(range(len(names)), key=keys.__getitem__)
    start = 0
    for key, size in SPLIT_SIZES.items():
        if key == split:
            return np.sort(np.asarray(order[start : start + size], dtype=np.int64))
        start += size
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class OmniglotSplit:
    """One split of Omniglot, ready for ``TaskSampler``.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        images: ``uint8`` array ``[n_classes, 20, H, W]``; strokes 255, background 0.
        class_names: ``"<Alphabet>/characterNN"``, with ``"/rot090"`` etc. for rotations.
        character_index: For each class, the index of its character in ``Omniglot``.
        rotation: For each class, its counterclockwise rotation in degrees.
    """

    name: str
    images: np.ndarray
    class_names: list[str]
    character_index: np.ndarray
    rotation: np.ndarray

    def __len__(self) -> int:
        return len(self.class_names)


class Omniglot:
    """All 1,623 Omniglot characters, decoded and cached.

    Images are ``uint8`` with strokes bright: each 105x105 one-bit image is converted to
    8-bit grey, resized to ``image_size`` with Pillow's ``resample`` filter, and inverted,
    so the background is 0 and strokes are up to 255 (the convention of the MAML and
    torchmeta pipelines). Divide by 255 for floats in ``[0, 1]``; ``TaskSampler`` does.

    The default filter, LANCZOS on the grey image, gives anti-aliased strokes. The MAML
    preprocessing script (Finn et al. 2017) also names LANCZOS but applies it to the
    one-bit image, which Pillow resizes nearest-neighbour: ``resample="nearest"``
    reproduces those binary images exactly. torchmeta resizes the grey image bilinearly
    (``resample="bilinear"``).

    Characters are in canonical order: background archive before evaluation, then
    alphabet name, then character folder name; drawings sorted by file name.

    Args:
        root: Data folder holding ``omniglot/``; ``None`` reads ``BILEVEL_DATA``. A zip
            is read when present, else its extracted folder.
        image_size: Side of the square output images (105 keeps the original size).
        cache_dir: Folder for the decoded cache; ``None`` reads ``BILEVEL_CACHE``, else
            ``~/.cache/bilevel``. If it cannot be written, a warning is given.
        download: Download missing zips from upstream and check their md5.
        resample: ``"lanczos"``, ``"bilinear"``, ``"box"`` or ``"nearest"``.
        check_md5: Refuse zips whose md5 is not a known one (``OMNIGLOT_MD5``).
        num_workers: Processes for the first decode; ``None`` uses the available CPUs
            (up to 8); 0 or 1 decodes in this process.
        progress: Show a progress bar while decoding.

    Attributes:
        images: ``uint8`` array ``[1623, 20, image_size, image_size]``.
        parts: Archive of each character (``"images_background"``/``"images_evaluation"``).
        alphabets: Alphabet of each character.
        characters: Folder name of each character (``"characterNN"``).
        names: ``"<Alphabet>/characterNN"`` of each character (unique).
        drawings: ``[1623, 20]`` array of file stems (``"XXXX_YY"``) of each image.
        pixel_sha256: SHA-256 of the original one-bit pixels (``OMNIGLOT_PIXEL_SHA256``).
        cache_path: The cache file used, or ``None`` if none could be written.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        image_size: int = 28,
        cache_dir: str | os.PathLike[str] | None = None,
        download: bool = False,
        resample: Literal["lanczos", "bilinear", "box", "nearest"] = "lanczos",
        check_md5: bool = True,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or not 1 <= image_size <= 1024
        ):
            raise ValueError(f"image_size must be an int in 1..1024, got {image_size!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {tuple(_RESAMPLE)}, got {resample!r}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None, got {num_workers}")
        self.image_size = image_size
        self.resample = resample
        folder = resolve_root(root) / "omniglot"
        sources = [_find_source(folder, part, download, check_md5) for part in OMNIGLOT_PARTS]

        cache = _cache_path(resolve_cache_dir(cache_dir), sources, image_size, resample)
        arrays = _load_cache(cache, image_size)
        decoded = arrays is None
        if arrays is None:
            workers = _default_workers() if num_workers is None else num_workers
            arrays = _decode_sources(sources, image_size, resample, workers, progress)
        n_characters, n_alphabets = len(arrays["parts"]), len(set(arrays["alphabets"].tolist()))
        if n_characters != N_CHARACTERS or n_alphabets != N_ALPHABETS:
            raise ValueError(
                f"{folder}: found {n_characters} characters in {n_alphabets} alphabets, "
                f"expected {N_CHARACTERS} in {N_ALPHABETS}; the data is incomplete"
            )
        if decoded and not _save_cache(cache, arrays):
            cache = None
        self.cache_path: Path | None = cache
        self.images: np.ndarray = arrays["images"]
        self.parts: list[str] = arrays["parts"].tolist()
        self.alphabets: list[str] = arrays["alphabets"].tolist()
        self.characters: list[str] = arrays["characters"].tolist()
        self.drawings: np.ndarray = arrays["drawings"]
        self.pixel_sha256: str = str(arrays["pixel_sha256"])
        self.names: list[str] = [
            f"{a}/{c}" for a, c in zip(self.alphabets, self.characters, strict=True)
        ]
        if self.pixel_sha256 != OMNIGLOT_PIXEL_SHA256:
            warn_user(
                f"{folder}: Omniglot pixels differ from the original release "
                f"(sha256 {self.pixel_sha256})",
                RuntimeWarning,
            )

    def __len__(self) -> int:
        return len(self.names)

    def split_indices(self, split: Literal["train", "val", "test"]) -> np.ndarray:
        """Character indices of a split; see ``omniglot_split_indices`` for the protocol.

        Args:
            split: ``"train"`` (1,100 characters), ``"val"`` (100) or ``"test"`` (423).

        Returns:
            Sorted ``int64`` indices into this object's characters.
        """
        return omniglot_split_indices(self.names, split)

    def split(
        self, split: Literal["train", "val", "test"], rotations: bool = True
    ) -> OmniglotSplit:
        """The classes of one split, optionally with rotated copies as extra classes.

        With ``rotations``, each character gives 4 classes, rotated by 0, 90, 180 and 270
        degrees (Santoro et al. 2016, "Meta-Learning with Memory-Augmented Neural
        Networks"; Finn et al. 2017): class ``4 * j + r`` is the ``j``-th character of the
        split rotated by ``90 * r`` degrees counterclockwise. Rotation happens within the
        split, so splits stay disjoint at the character level.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            rotations: Add the rotated classes.

        Returns:
            The split; its ``images`` array is a new array ``[n_classes, 20, H, W]``.
        """
        index = self.split_indices(split)
        base = self.images[index]
        names = [self.names[i] for i in index]
        if not rotations:
            return OmniglotSplit(split, base.copy(), names, index, np.zeros(len(index), np.int64))
        rotated = np.stack([np.rot90(base, k, axes=(-2, -1)) for k in range(4)], axis=1)
        n, _, d, h, w = rotated.shape
        return OmniglotSplit(
            split,
            np.ascontiguousarray(rotated.reshape(n * 4, d, h, w)),
            [f"{name}/rot{90 * k:03d}" for name in names for k in range(4)],
            np.repeat(index, 4),
            np.tile(np.arange(4, dtype=np.int64) * 90, len(index)),
        )


def _cache_path(cache_dir: Path, sources: list[_Source], image_size: int, resample: str) -> Path:
    """Cache file named by image size, filter and a hash of the sources' fingerprints."""
    fingerprint = "|".join(s.fingerprint for s in sources)
    key_text = f"v{_CACHE_VERSION}|{image_size}|{resample}|{fingerprint}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    return cache_dir / f"omniglot-{image_size}px-{resample}-{key}.npz"


def _decode_sources(
    sources: list[_Source], image_size: int, resample: str, num_workers: int, progress: bool
) -> dict[str, np.ndarray]:
    """Decode all images of all sources into the arrays stored in the cache."""
    characters: dict[tuple[int, str, str], list[str]] = {}
    for p, source in enumerate(sources):
        for name in _list_members(source):
            _, alphabet, character, _ = name.split("/")
            characters.setdefault((p, alphabet, character), []).append(name)
    keys = sorted(characters)
    for key in keys:
        if len(characters[key]) != N_DRAWINGS:
            part, alphabet, character = OMNIGLOT_PARTS[key[0]], key[1], key[2]
            raise ValueError(
                f"{sources[key[0]].path}: {part}/{alphabet}/{character} has "
                f"{len(characters[key])} drawings, expected {N_DRAWINGS}"
            )
        characters[key].sort()

    jobs = []
    for p, source in enumerate(sources):
        names = [n for key in keys if key[0] == p for n in characters[key]]
        for start in range(0, len(names), _CHUNK):
            chunk = names[start : start + _CHUNK]
            jobs.append((str(source.path), source.is_zip, chunk, image_size, resample))
    results = _decode_all(jobs, num_workers, progress)
    n = len(keys)
    size = image_size
    images = np.concatenate([r[0] for r in results]).reshape(n, N_DRAWINGS, size, size)
    bits = np.concatenate([r[1] for r in results])
    return {
        "images": images,
        "parts": np.array([OMNIGLOT_PARTS[k[0]] for k in keys]),
        "alphabets": np.array([k[1] for k in keys]),
        "characters": np.array([k[2] for k in keys]),
        "drawings": np.array(
            [[n.rsplit("/", 1)[1].removesuffix(".png") for n in characters[k]] for k in keys]
        ).reshape(n, N_DRAWINGS),
        "pixel_sha256": np.array(hashlib.sha256(bits.tobytes()).hexdigest()),
    }


_CACHE_KEYS = ("images", "parts", "alphabets", "characters", "drawings", "pixel_sha256")


def _load_cache(path: Path, image_size: int | None = None) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` (with a warning) when the file is unreadable, damaged
    or does not hold what its name says (images of another size than ``image_size``)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {key: f[key] for key in _CACHE_KEYS}
    except Exception as exc:  # zipfile, zlib, NumPy and OS errors: a damaged file
        warn_user(f"ignoring unreadable cache {path} ({exc!r})", RuntimeWarning)
        return None
    problem = _malformed(arrays, image_size)
    if problem is not None:
        warn_user(
            f"ignoring malformed cache {path}: {problem}; it is decoded again",
            RuntimeWarning,
        )
        return None
    return arrays


def _malformed(arrays: dict[str, np.ndarray], image_size: int | None) -> str | None:
    """What in a cache's arrays is not what a decode writes (``None`` when nothing is)."""
    images = arrays["images"]
    size = image_size if image_size is not None else (images.shape[-1] if images.ndim else -1)
    shape = (N_CHARACTERS, N_DRAWINGS, size, size)
    if images.shape != shape or images.dtype != np.uint8:
        return f"images {images.shape} {images.dtype}, expected uint8 {shape}"
    expected = {
        "parts": (N_CHARACTERS,),
        "alphabets": (N_CHARACTERS,),
        "characters": (N_CHARACTERS,),
        "drawings": (N_CHARACTERS, N_DRAWINGS),
        "pixel_sha256": (),
    }
    for key, key_shape in expected.items():
        value = arrays[key]
        if value.shape != key_shape or value.dtype.kind != "U":
            return f"{key} {value.shape} {value.dtype}, expected strings {key_shape}"
    if not set(arrays["parts"].tolist()) <= set(OMNIGLOT_PARTS):
        return "parts other than " + " and ".join(OMNIGLOT_PARTS)
    if len(set(arrays["alphabets"].tolist())) != N_ALPHABETS:
        return f"not {N_ALPHABETS} alphabets"
    return None


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write the cache atomically (temporary file + ``os.replace``); False on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        warning = cure_error(
            RuntimeWarning,
            "could not write the Omniglot cache {path} ({exc}); {cache_dir} or set {env} to a "
            "writable folder to avoid decoding on every load",
            path=path,
            exc=exc,
            env=CACHE_ENV,
        )
        warn_user(warning)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
