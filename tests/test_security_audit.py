"""Security audit: files that bilevel reads or writes on a user's behalf.

- a crafted checkpoint in torch's legacy (non-zip) format, or one that names a global of a
  module torch blocks (``os.system``), is refused and reported as unsafe, not as a damaged
  copy;
- an IDX gzip file that expands far beyond what its header announces (a decompression bomb)
  is reported without being decompressed into memory;
- a checkpoint tensor with more elements than its storage (a stride-0 view claiming 2^40) is
  refused on load, also inside a set, as a sparse tensor's indices or values, or as an
  attribute of another tensor, and ``save`` does not write one; so is a sparse tensor with
  indices outside its shape; shared and self-referencing containers are walked once;
- the examples' folder lock does not follow a symbolic link planted in the output folder, nor
  write through a hard link.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from example_modules import example_module

from bilevel import checkpoint
from bilevel.checkpoint import CheckpointError
from bilevel.data import read_idx


class _RunsSystem:
    """Unpickling this runs ``os.system`` (a module torch's weights-only loader blocks)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_crafted_checkpoint_calling_os_system_is_reported_as_unsafe(
    tmp_path: Path, zip_format: bool
) -> None:
    """BUG (before the fix): torch words a blocked module's global as "unsupported GLOBAL
    posix.system whose module posix is blocked"; that was not recognised, so a legacy-format
    file crafted to run code was reported as "truncated or corrupted" (restore it from a copy),
    and the zip one's reason was the first line of torch's advice, not the global."""
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.pt"
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "x": _RunsSystem(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert not marker.exists()
    assert "cannot be loaded safely" in message and "truncated" not in message
    assert "a reference to" in message and "system" in message


def test_a_gzip_idx_file_that_expands_past_its_header_is_not_read_whole(tmp_path: Path) -> None:
    """BUG (before the fix): read_idx decompressed the whole file before comparing its size
    with the header: a 64 KB gzip file of labels announcing 10 bytes and holding 64 MiB took
    over 64 MiB of memory (a 10 MB file, 10 GB) before the mismatch was reported."""
    path = tmp_path / "labels-idx1-ubyte.gz"
    extra = 64 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    with open(path, "wb") as f:
        f.write(compressor.compress(struct.pack(">II", 2049, 10) + bytes(range(10))))
        block = bytes(1 << 20)
        for _ in range(extra >> 20):
            f.write(compressor.compress(block))
        f.write(compressor.flush())
    assert path.stat().st_size < extra // 100
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"gives shape \(10,\).*more than 10 bytes"):
            read_idx(path, expected_magic=2049)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held to read 10 bytes of labels"
    # the control: the same labels without the excess read as before
    (tmp_path / "good.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, 10) + bytes(range(10)))
    )
    assert read_idx(tmp_path / "good.gz", expected_magic=2049).tolist() == list(range(10))


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW (not POSIX)")
def test_the_run_lock_does_not_follow_a_symbolic_link(tmp_path: Path) -> None:
    """BUG (before the fix): FolderLock opened OUT/run.lock following links, then truncated it
    and wrote its PID there: a link planted in a shared output folder made the run overwrite
    the file it pointed to (here, a file outside the folder lost its content)."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    with example_module("_common") as common:
        with pytest.raises(SystemExit, match="symbolic link") as error:
            common.FolderLock(out).acquire()
        assert str(out / "run.lock") in str(error.value)
    assert victim.read_text() == "keep me\n"
    assert (out / "run.lock").is_symlink()  # left for the user to look at


def test_a_checkpoint_tensor_with_more_elements_than_its_storage_is_refused(
    tmp_path: Path,
) -> None:
    """BUG (before the fix): a stride-0 view of one stored number, claiming 2^40 elements in a
    file of a few hundred bytes, loaded without a word; an optimizer's ``load_state_dict``
    casting it to its parameter's dtype would then try to allocate 8 TiB."""
    inflated = torch.zeros((), dtype=torch.float32).expand(2**40)
    path = tmp_path / "crafted.pt"
    torch.save(
        {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "opt": [inflated]}, path
    )
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointError, match="more elements") as error:
        checkpoint.load(path)
    assert "['opt'][0]" in str(error.value) and str(path) in str(error.value)
    # a dense tensor, and a view that overlaps within its storage, load as they are
    dense = torch.arange(6.0)
    window = torch.arange(4.0).as_strided((3, 2), (1, 1))  # 6 elements over 4 stored
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "w": dense}, path)
    assert torch.equal(checkpoint.load(path)["w"], dense)
    assert window.numel() > window.untyped_storage().nbytes() // window.element_size()
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "w": window}, path)
    with pytest.raises(CheckpointError, match="more elements"):
        checkpoint.load(path)


def test_save_refuses_a_tensor_that_load_would_refuse(tmp_path: Path) -> None:
    """BUG (before the fix): ``save`` wrote an expanded view, which ``load`` refuses (above):
    a checkpoint that could not be resumed. It is refused when written, naming the cure, and
    an existing file at the path is left as it was."""
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"step": 1})
    with pytest.raises(TypeError, match=r"contiguous\(\)"):
        checkpoint.save(path, {"step": 2, "lam": torch.ones(1).expand(1000)})
    assert checkpoint.load(path)["step"] == 1
    checkpoint.save(path, {"step": 3, "lam": torch.ones(1).expand(1000).contiguous()})
    assert checkpoint.load(path)["lam"].shape == (1000,)


def test_the_run_lock_does_not_write_through_a_hard_link(tmp_path: Path) -> None:
    """BUG (before the fix): O_NOFOLLOW stops a symbolic link, not a hard link: a run.lock
    planted as a second name of another file had the run truncate that file and write its PID
    there."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / "run.lock")
    with example_module("_common") as common:
        with pytest.raises(SystemExit, match="other names") as error:
            common.FolderLock(out).acquire()
        assert str(out / "run.lock") in str(error.value)
    assert victim.read_text() == "keep me\n"


def _inflated_sparse() -> torch.Tensor:
    """A sparse tensor whose indices and values are stride-0 views of one stored entry,
    claiming 2^40 of them."""
    indices = torch.zeros((1, 1), dtype=torch.long).expand(1, 2**40)
    values = torch.zeros((), dtype=torch.float16).expand(2**40)
    return torch.sparse_coo_tensor(
        indices, values, (5,), check_invariants=False, is_coalesced=False
    )


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda: {torch.zeros((), dtype=torch.float16).expand(2**40)}, id="in-a-set"),
        pytest.param(_inflated_sparse, id="sparse-components"),
    ],
)
def test_an_inflated_tensor_inside_a_set_or_a_sparse_tensor_is_refused(
    tmp_path: Path, where
) -> None:
    """BUG (before the fix): the walk for tensors with more elements than their storage looked
    through dicts, lists and tuples only. A weights-only load also returns sets, and sparse
    tensors built from strided ones (torch does not check sparse invariants on load by
    default): either carried a stride-0 view claiming 2^40 entries in a file of a few KiB,
    which an optimizer's ``load_state_dict`` casts to its parameter's dtype (it recurses into
    any iterable, and casts a sparse tensor's values): 8 TiB asked for."""
    path = tmp_path / "crafted.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "opt": [where()]}, path)
    assert path.stat().st_size < 8192
    with pytest.raises(CheckpointError, match="more elements") as error:
        checkpoint.load(path)
    assert "['opt'][0]" in str(error.value)  # (a sparse tensor's: ['opt'][0]['indices'])
    # legitimate sparse tensors and sets load as they are
    sparse = torch.tensor([[0.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    payload = {"coo": sparse.to_sparse(), "csr": sparse.to_sparse_csr(), "set": {1, 2}}
    checkpoint.save(path, payload)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["coo"].to_dense(), sparse)
    assert torch.equal(loaded["csr"].to_dense(), sparse)
    assert loaded["set"] == {1, 2}


def _sparse_out_of_range() -> dict[str, torch.Tensor]:
    """Sparse tensors whose indices point outside their shape (a COO index 7 in a tensor of
    5 entries, a CSR column 9 of 2), built without torch's checks."""
    coo = torch.sparse_coo_tensor(
        torch.tensor([[0, 7]]), torch.ones(2), (5,), check_invariants=False
    )
    csr = torch.sparse_csr_tensor(
        torch.tensor([0, 1, 2]),
        torch.tensor([0, 9]),
        torch.ones(2),
        (2, 2),
        check_invariants=False,
    )
    return {"coo": coo, "csr": csr}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_tensor_with_indices_outside_its_shape_is_refused(
    tmp_path: Path, layout: str
) -> None:
    """BUG (before the fix): torch checks a loaded sparse tensor's indices against its shape
    only inside ``torch.sparse.check_sparse_tensor_invariants``, which ``load`` did not enter:
    a crafted file's out-of-range indices loaded silently, and converting the tensor (to_dense,
    or any op that reads it) reads and writes memory outside the tensor's. Refused now, with
    where it is; ``save`` refuses to write one."""
    bad = _sparse_out_of_range()[layout]
    path = tmp_path / "crafted.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "opt": [bad]}, path)
    with pytest.raises(CheckpointError, match="indices outside") as error:
        checkpoint.load(path)
    assert "['opt'][0]" in str(error.value)
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"step": 1})
    with pytest.raises(TypeError, match="indices outside"):
        checkpoint.save(good, {"step": 2, "bad": bad})
    assert checkpoint.load(good)["step"] == 1


def test_shared_and_self_referencing_containers_are_walked_once(tmp_path: Path) -> None:
    """BUG (before the fix): the checks of a loaded checkpoint walked its containers as trees,
    so a list holding one list twice, 40 levels deep (a file of a few KiB, which pickle
    stores once per object), took 2^40 visits and hung ``load``; a list that holds itself
    raised a bare RecursionError. Each container is now visited once, iteratively."""
    shared: list = [torch.ones(1, dtype=torch.float64)]
    for _ in range(40):
        shared = [shared, shared]
    looped: list = [torch.ones(1)]
    looped.append(looped)
    path = tmp_path / "shared.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "a": shared}, path)
    assert path.stat().st_size < 16384
    start = time.process_time()
    loaded = checkpoint.load(path)
    assert time.process_time() - start < 10
    assert loaded["a"][0] is loaded["a"][1]
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "a": looped}, path)
    assert checkpoint.load(path)["a"][1] is not None
    # ... and a bad tensor deep inside is still found, with where it is
    deep: list = [_sparse_out_of_range()["coo"]]
    for _ in range(3):
        deep = [deep, deep]
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "a": deep}, path)
    with pytest.raises(CheckpointError, match=r"\['a'\]\[0\]\[0\]\[0\]\[0\]"):
        checkpoint.load(path)


def test_a_tensor_hung_on_another_tensor_is_checked(tmp_path: Path) -> None:
    """BUG (before the fix): an attribute set on a tensor (``t.hidden = ...``) survives a
    weights-only load, and the checks never looked there: a stride-0 view claiming 2^40
    entries loaded silently, which ``copy.deepcopy`` of its tensor (as a method's state is
    copied) would expand into terabytes."""
    carrier = torch.ones(2, dtype=torch.float64)
    carrier.hidden = torch.zeros((), dtype=torch.float16).expand(2**40)
    path = tmp_path / "crafted.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "a": [carrier]}, path)
    with pytest.raises(CheckpointError, match=r"more elements") as error:
        checkpoint.load(path)
    assert "['a'][0].hidden" in str(error.value)
