"""Checkpoints (safe to load), RNG state, and the one atomic writer.

A checkpoint is a dict of tensors and plain values (dicts, lists, tuples, str, int, float,
bool, None) written by ``torch.save`` and read by ``torch.load(weights_only=True)``: loading
a file never runs code from it. A file that the weights-only loader refuses (a file crafted to
run code, or a checkpoint of a bilevel older than format 2, which pickled Python and NumPy
objects) raises :class:`CheckpointError`; bilevel never falls back to ``weights_only=False``.
This is as safe as torch's weights-only unpickler: use torch 2.10 or later, which fixes the
known ways around it (CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10).

Tensors are loaded onto the CPU (``map_location="cpu"``): a checkpoint written on a GPU
loads on a machine without one, and ``load_state_dict`` of a module or an optimizer copies
each tensor to the device of the parameter it belongs to (so a GPU run resumes on its GPU at
the cost of one host-to-device copy). RNG states must be CPU tensors anyway.

Checkpoints and the examples' files (``progress.json``, ``results.json``, ``log.csv``) are
written by :func:`atomic_write`: a temporary file beside the target, ``fsync``,
``os.replace``. An interruption leaves either the old file or the new one, never a part of one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import inspect
import os
import pickle
import random
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT = "bilevel-checkpoint"
#: format 1 (bilevel before this module) pickled Python and NumPy objects; it is not loaded
VERSION = 2
_TMP_SUFFIX = ".tmp"
# the random part of a name tempfile.mkstemp gives
_TEMPORARY_NAME = re.compile(r"[a-z0-9_]{8}")


def _umask() -> int:
    """The process's umask (read once: setting it to read it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# files are written with the permissions open() would give them (mkstemp's are 0600)
_FILE_MODE = 0o666 & ~_umask()
_writing: set[str] = set()  # names of the temporary files this process is writing now
# torch >= 2.1 can check a file without reading its tensors' bytes
_MMAP = {"mmap": True} if "mmap" in inspect.signature(torch.load).parameters else {}


class CheckpointError(ValueError):
    """A file that cannot be loaded as a bilevel checkpoint; the message names the file and
    says what to do."""


# --- the one atomic writer ---------------------------------------------------------------


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` (naming ``path`` and the cure) if a file could not be written at
    ``path`` as :func:`atomic_write` writes it: a folder there, or a folder that cannot be
    made or written to. ``BilevelProblem.run`` asks before its first UL step, so that a bad
    checkpoint path is not found at the first save, after the steps before it."""
    path = Path(path)
    try:
        _make_folder_for(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=_TMP_SUFFIX)
        os.close(fd)
        os.unlink(tmp)
    except IsADirectoryError:
        raise  # (it names the cure)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot write a checkpoint at {path} ({error.strerror or error}): choose a path "
            "in a folder this process can create and write to. No UL step was taken.",
        ) from None


def _make_folder_for(path: Path) -> None:
    """Refuse a folder at ``path`` (``os.replace`` onto it would fail after the whole write)
    and create ``path``'s folder if needed."""
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR,
            f"{path} is a folder: give the path of a file in it, e.g. {path / 'checkpoint.pt'}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file beside ``path`` (opened
    ``"wb"``), which is flushed, ``fsync``-ed and renamed onto ``path`` with ``os.replace``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it
    was; a process killed mid-write leaves a temporary file, which the next successful write
    of ``path`` removes (temporary files of processes still running on this machine are
    kept, and files of other names are never touched). ``path``'s folder is created if
    needed, and the file gets the permissions ``open`` would give it (the umask's).

    Args:
        path: the file to write.
        write: writes the whole content to the binary file object it is given.
        check: called with the temporary file's path once it is complete, before the rename;
            raising there leaves ``path`` untouched.
    """
    path = Path(path)
    _make_folder_for(path)
    prefix = f"{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=_TMP_SUFFIX)
    _writing.add(Path(tmp).name)
    try:
        if os.name == "posix":
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _writing.discard(Path(tmp).name)
    _fsync_folder(path.parent)
    _remove_stale_temporaries(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write` (no format check: use
    :func:`save` for checkpoints)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` through :func:`atomic_write` (e.g. a JSON file)."""
    data = text.encode(encoding)
    atomic_write(path, lambda f: f.write(data))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); best effort."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (POSIX; elsewhere: unknown, False)."""
    if os.name != "posix":
        return False  # os.kill would terminate it; a temporary file still open stays anyway
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``PATH.<pid>.<random>.tmp`` left by killed writers of ``path`` (and the
    ``PATH.<random>.tmp`` of older bilevel versions)."""
    start = len(path.name) + 1
    for stale in path.parent.glob(glob.escape(path.name) + ".*" + _TMP_SUFFIX):
        fields = stale.name[start : -len(_TMP_SUFFIX)].split(".")
        if not _TEMPORARY_NAME.fullmatch(fields[-1]) or len(fields) > 2:
            continue  # not a name mkstemp gave (a user's own file: never removed)
        if len(fields) == 2 and fields[0].isdigit():
            pid = int(fields[0])
            if pid == os.getpid():  # a write under way in another thread, or else left by
                in_use = stale.name in _writing  # an earlier process with this id (a restart)
            else:
                in_use = _alive(pid)
            if in_use:
                continue
        with contextlib.suppress(OSError):
            stale.unlink()


# --- RNG state ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The states of the torch, CUDA (if available), Python ``random`` and NumPy (legacy
    ``np.random``) generators, as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from :func:`rng_state`: the next draws are bitwise those that
    followed it. CUDA states are restored when CUDA is available (on as many devices as both
    the saved state and this machine have); the NumPy state when NumPy is installed.

    Raises:
        CheckpointError: a state the generators refuse (a damaged or crafted file).
    """
    try:
        _set_generators(state)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, AttributeError) as e:
        raise CheckpointError(
            f"the checkpoint's random-generator state is damaged ({type(e).__name__}: {e}): "
            "it was not written by bilevel's save, or was changed since. Restore the file from "
            "a copy, or start a new run."
        ) from None


def _set_generators(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    internal = tuple(int(v) for v in python["state"].tolist())
    gauss_next = python["gauss_next"]
    random.setstate((int(python["version"]), internal, gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    np = _numpy()
    if "numpy" in state and np is not None:
        saved = state["numpy"]
        key = saved["key"].numpy().astype(np.uint32)
        legacy = (saved["name"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        np.random.set_state(legacy)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        return None
    return numpy


# --- checkpoints -------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` with its numbers and strings as Python's own types (NumPy scalars, enums and
    other subclasses of int, float, str and bool become plain values), through dicts, lists
    and tuples; tensors and anything else are returned as they are. A weights-only load
    refuses NumPy scalars and enums; a learning rate from ``np.logspace`` is one."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, int):  # bool has no subclasses
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)  # the characters (str() of a str-mixin enum is its name)
    if type(value) is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain(v) for v in value)
    np = _numpy()
    if np is not None and isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    return value


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write the checkpoint ``{"format": "bilevel-checkpoint", "version": 2, **payload}`` to
    ``path`` atomically.

    The written file is checked with the loader's weights-only unpickler before it replaces
    ``path``, so a checkpoint that :func:`load` would refuse is never written.

    Raises:
        TypeError: ``payload`` holds objects a weights-only load refuses (keep to tensors and
            plain values; see :func:`plain`); ``path`` is left as it was.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload must be a dict, got {type(payload).__name__}.")
    header = {"format": FORMAT, "version": VERSION}
    for key, value in header.items():
        if key in payload and payload[key] != value:
            raise ValueError(f"the checkpoint payload may not set {key!r} (got {payload[key]!r}).")
    checkpoint = {**header, **payload}

    def check(tmp: Path) -> None:
        try:  # with mmap, the tensors' bytes are not read, only the pickled structure
            written = torch.load(tmp, weights_only=True, map_location="cpu", **_MMAP)
        except pickle.UnpicklingError as error:
            raise TypeError(
                f"the checkpoint for {path} holds objects that a weights-only load refuses "
                f"({_refusal(error)}); {path} was left as it was. Save tensors and plain values "
                "only (dict, list, tuple, str, int, float, bool, None)."
            ) from None
        unsafe = _unsafe_tensor(written)
        if unsafe is not None and unsafe[0] == "inflated":
            raise TypeError(
                f"the checkpoint for {path} holds a tensor ({unsafe[1]}) with more elements "
                f"than its storage: a view whose entries share memory (expand, stride 0), "
                f"which load refuses; {path} was left as it was. Save .contiguous() or the "
                "tensor it was expanded from."
            )
        if unsafe is not None:
            raise TypeError(
                f"the checkpoint for {path} holds a sparse tensor with indices outside its "
                f"shape or out of order ({unsafe[1]}), which load refuses; {path} was left as "
                "it was. Build sparse tensors with check_invariants=True."
            )

    atomic_write(path, lambda f: torch.save(checkpoint, f), check=check)


def load(path: str | os.PathLike, require: Iterable[str] = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, without running code from it.

    ``torch.load(path, weights_only=True, map_location="cpu")``: tensors are on the CPU (see
    the module's docstring). The result includes the ``"format"`` and ``"version"`` keys.

    Args:
        path: the checkpoint file.
        require: keys the checkpoint must have (e.g. ``("ul_model", "step")``).

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupted (the CRC-32 of
            each member of the archive is checked: torch does not); it holds objects
            that a safe load refuses (a file crafted to run code, or a checkpoint of an older
            bilevel); it is not a bilevel checkpoint, is of another format version, or lacks
            a required key. The message names the file and says what to do.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file. Check the path.") from None
    except OSError as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({error.strerror or error}). Check the path "
            "and its permissions."
        ) from None
    if size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): not a checkpoint, perhaps a copy or save cut short "
            "outside bilevel's atomic writer. Restore it from a copy, or delete it to start "
            "the run again."
        )
    try:
        damaged = _damaged_member(path)
    except OSError as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({error.strerror or error}). Check the path "
            "and its permissions."
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is corrupted: {damaged} does not read back as torch.save recorded it "
            "(its bytes, size or header do not match the archive's directory: a bit flipped "
            "on disk or in a copy, or an edit). Restore it from a copy, or delete it to start "
            "the run again."
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (FileNotFoundError, PermissionError) as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({error.strerror or error}). Check the path "
            "and its permissions."
        ) from None
    except Exception as error:  # torch's readers raise many types (OSError too) on damage
        raise CheckpointError(_load_failure(path, error)) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(_foreign(path, state))
    unsafe = _unsafe_tensor(state)
    if unsafe is not None and unsafe[0] == "inflated":
        raise CheckpointError(
            f"{path} cannot be loaded safely: it holds a tensor ({unsafe[1]}) with more elements "
            "than its storage in the file (entries sharing memory, as expand makes), which "
            "would take far more memory than the file once copied or converted. bilevel's save "
            "never writes one: the file was crafted or written by other code. Restore it from "
            "a copy, or delete it to start the run again."
        )
    if unsafe is not None:
        raise CheckpointError(
            f"{path} cannot be loaded safely: it holds a sparse tensor with indices outside its "
            f"shape or out of order ({unsafe[1]}), which would read and write memory outside "
            "the tensor's once used. bilevel's save never writes one: the file was crafted or "
            "damaged before it was saved. Restore it from a copy, or delete it to start the "
            "run again."
        )
    if state["format"] != FORMAT:
        raise CheckpointError(
            f"{path} is not a bilevel checkpoint (its format is {state['format']!r}). Point to "
            "a checkpoint written by bilevel, or delete the file to start the run again."
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a bilevel checkpoint of format version {state.get('version')!r}; this "
            f"bilevel reads version {VERSION}. Resume it with the bilevel that wrote it, or "
            "start the run again (delete the file, or use another checkpoint path)."
        )
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is a bilevel checkpoint without {', '.join(map(repr, missing))}: it was "
            "written for something else (e.g. a best-model file, not a training checkpoint). "
            "Point to the right file, or delete it to start the run again."
        )
    return state


def _first_found(value: Any, check: Callable[[torch.Tensor, str], Any], where: str = "") -> Any:
    """``check(tensor, where)`` on each tensor in ``value`` (dicts, lists, tuples, sets: what a
    weights-only load returns), ``where`` naming it (``"['opt']['state'][0]"``); the first
    answer that is not ``None``, or ``None``. Each container and tensor is visited once, and
    without recursion: a pickle stores a shared object once, so a file of a few KiB can hold
    a list that holds one list twice, 40 levels deep (2^40 paths), or a list that holds
    itself."""
    pending: list[tuple[Any, str]] = [(value, where)]
    seen: set[int] = set()
    while pending:
        item, at = pending.pop()
        if id(item) in seen:
            continue
        if isinstance(item, torch.Tensor):
            seen.add(id(item))
            found = check(item, at or "the checkpoint")
            if found is not None:
                return found
            # attributes set on a tensor survive a weights-only load, and copy.deepcopy
            # copies them (a stride-0 one into all its elements)
            pending.extend((child, f"{at}.{name}") for name, child in vars(item).items())
            continue
        if isinstance(item, dict):
            items: Iterable[tuple[Any, Any]] = item.items()
        elif isinstance(item, (list, tuple, set)):
            items = enumerate(item)
        else:
            continue
        seen.add(id(item))
        pending.extend(reversed([(child, f"{at}[{key!r}]") for key, child in items]))
    return None


def _unsafe_tensor(value: Any) -> tuple[str, str] | None:
    """The first tensor in ``value`` that is unsafe to use, as ``(kind, where and why)``, or
    ``None``. ``"inflated"``: more elements than its storage holds. torch refuses a tensor
    that reaches past its storage, but not one whose entries overlap: a stride-0 view of one
    stored number can claim 2^40 elements, and copying or converting it (an optimizer's
    ``load_state_dict`` casts its state, through any iterable) allocates all of them; a
    sparse tensor's parts (indices, values) are checked as such. ``"sparse"``: a sparse
    tensor that breaks torch's invariants (indices outside its shape, compressed indices out
    of order), which torch checks on load only inside
    ``torch.sparse.check_sparse_tensor_invariants``; reading one (``to_dense``, any op) reads
    and writes outside its memory. A tensor is checked for the first before the second,
    which reads every index."""
    return _first_found(value, _unsafe)


def _unsafe(value: torch.Tensor, where: str) -> tuple[str, str] | None:
    """:func:`_unsafe_tensor`'s check of one tensor."""
    inflated = _inflated(value, where)
    if inflated is not None:
        return "inflated", inflated
    reason = _sparse_reason(value, where)
    return None if reason is None else ("sparse", reason)


def _inflated(value: torch.Tensor, where: str) -> str | None:
    """Where and how ``value`` (or a sparse tensor's part) holds more elements than its
    storage, or ``None``."""
    if value.layout != torch.strided:
        return _first_found(_sparse_parts(value), _inflated, where)
    stored = value.untyped_storage().nbytes() // max(value.element_size(), 1)
    if value.numel() > stored:
        return f"{where}: shape {tuple(value.shape)}, {stored} stored"
    return None


def _sparse_reason(value: torch.Tensor, where: str) -> str | None:
    """Where and why a sparse ``value`` breaks torch's invariants, or ``None``: torch's own
    check, on a copy built from its parts (a COO tensor's claim to be coalesced included)."""
    if value.layout == torch.strided:
        return None
    parts = list(_sparse_parts(value).values())
    try:
        if value.layout == torch.sparse_coo:
            torch.sparse_coo_tensor(
                *parts, value.shape, check_invariants=True, is_coalesced=value.is_coalesced()
            )
        elif parts:
            torch.sparse_compressed_tensor(
                *parts, value.shape, layout=value.layout, check_invariants=True
            )
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        return f"{where}: {reason[:160]}"
    return None


def _sparse_parts(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The strided tensors a sparse tensor is made of (COO, or compressed: CSR, CSC, BSR,
    BSC), by name; none for another layout."""
    if value.layout == torch.sparse_coo:
        return {"indices": value._indices(), "values": value._values()}
    if value.layout in (torch.sparse_csr, torch.sparse_bsr):
        compressed, plain = "crow_indices", "col_indices"
    elif value.layout in (torch.sparse_csc, torch.sparse_bsc):
        compressed, plain = "ccol_indices", "row_indices"
    else:
        return {}
    names = (compressed, plain, "values")
    return {name: getattr(value, name)() for name in names}


def _damaged_member(path: Path) -> str | None:
    """The first member of a zip-format torch file that is damaged, or ``None``. torch's
    reader does not check the CRC-32s: one flipped bit in a tensor loads silently. Each
    member's bytes *as torch's reader reads them* must match the size and CRC-32 of the
    archive's central directory (Python's zipfile and torch's reader can disagree on a
    damaged header: one flipped bit in a local header's name length, or a member marked as a
    folder, made torch read another tensor's bytes, or none, while zipfile's check passed),
    and the local headers must agree with it (zipfile's checks, without reading the data).
    Members without a CRC (``torch.serialization.set_crc32_options(False)`` writes 0) are
    checked for size only; files of torch's older, non-zip format are not checked, and an
    archive that is not a readable zip is left to ``torch.load`` to report."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError):
        return None  # not a readable zip: torch.load says what it is
    with archive:
        infos = archive.infolist()
        for info in infos:
            try:
                with archive.open(info):  # the local header against the central directory
                    pass
            except OSError:
                raise
            except Exception:  # BadZipFile, an encrypted flag, a name that does not decode
                return info.filename
    if not infos:
        return None
    root = infos[0].filename.split("/", 1)[0] + "/"
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = set(reader.get_all_records())
    except Exception:  # torch's reader refuses the archive: torch.load will too
        return "the archive's directory"
    for info in infos:
        name = info.filename[len(root) :] if info.filename.startswith(root) else None
        if info.is_dir() or name not in records:
            return info.filename
        try:
            data = reader.get_record(name)
        except Exception:
            return info.filename
        if len(data) != info.file_size or (info.CRC and zlib.crc32(data) != info.CRC):
            return info.filename
    return None


# torch's words for a refused global: "Unsupported global: GLOBAL builtins.eval was not an
# allowed global" or, for a module it blocks (os, subprocess, ...), "Trying to load unsupported
# GLOBAL posix.system whose module posix is blocked"
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)


def _refusal(error: BaseException) -> str:
    """The reason in a weights-only unpickler error, in a few words."""
    message = str(error)
    found = _UNSUPPORTED_GLOBAL.search(message)
    if found:
        return f"a reference to {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    reason = found.group(1) if found else message.strip().splitlines()[0] if message else ""
    return reason.strip().rstrip(".") or type(error).__name__


def _load_failure(path: Path, error: Exception) -> str:
    """The message for a file that ``torch.load(weights_only=True)`` did not load."""
    message = str(error)
    refused = _UNSUPPORTED_GLOBAL.search(message) is not None or (
        "Weights only load failed" in message and zipfile.is_zipfile(path)
    )
    if refused:
        return (
            f"{path} cannot be loaded safely: it holds Python objects that the weights-only "
            f"loader refuses ({_refusal(error)}), because loading them would run code. Either "
            "the file was crafted to run code, or it is a checkpoint of an older bilevel "
            "(before checkpoint format 2), which pickled Python and NumPy objects. bilevel does "
            "not load such files: restart the run (delete the file, or use another checkpoint "
            "path or --out). Only whoever trusts the file may convert it, by reading it with "
            "torch.load(path, weights_only=False) and saving its tensors and plain values again."
        )
    if "Weights only load failed" in message:  # skip torch's advice, keep its reason
        first = _refusal(error)
    else:
        first = message.strip().splitlines()[0] if message.strip() else ""
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return (
        f"{path} is not a readable checkpoint ({reason}): it is truncated or corrupted (e.g. a "
        "copy cut short, or a full disk), or not a file written by torch.save. Restore it from "
        "a copy, or delete it to start the run again."
    )


def _foreign(path: Path, state: Any) -> str:
    """The message for a torch file without the bilevel checkpoint header."""
    if isinstance(state, dict) and {"step", "ul_model"} <= set(state):
        what = (
            "it looks like a checkpoint of an older bilevel (format 1), which this version "
            "cannot resume: start the run again (delete the file, or use another path)"
        )
    else:
        held = (
            "a dict without a 'format' entry"
            if isinstance(state, dict)
            else f"a {type(state).__name__}, not a dict"
        )
        what = (
            f"it holds {held} (e.g. a state_dict saved with torch.save). Point to a checkpoint "
            "written by bilevel (BilevelProblem.save_checkpoint or bilevel.checkpoint.save), or "
            "delete the file to start again"
        )
    return f"{path} is a torch file but not a bilevel checkpoint: {what}."
