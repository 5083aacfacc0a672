"""Private helpers: md5 sums, MD5SUMS files and verified downloads."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["download_file", "md5sum", "read_md5sums"]


def md5sum(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hexadecimal md5 digest of a file.

    Args:
        path: File to hash.
        chunk_size: Bytes read at a time.

    Returns:
        The 32-character lowercase hex digest.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def read_md5sums(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse an ``MD5SUMS`` file (``md5sum`` output: ``<hex>  <name>`` per line).

    Args:
        path: The ``MD5SUMS`` file.

    Returns:
        A mapping from file name to lowercase hex digest.
    """
    sums: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def download_file(urls: Sequence[str], dest: Path, md5s: Sequence[str]) -> None:
    """Download a file from the first URL that works and check its md5.

    The file is written to a temporary name beside ``dest`` and moved into place only
    after its md5 matched one of ``md5s``.

    Args:
        urls: Candidate URLs (mirrors), tried in order.
        dest: Where the file goes; its folder is created.
        md5s: Accepted md5 digests.

    Raises:
        OSError: If every URL failed or no download had an accepted md5.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                while block := resp.read(1 << 20):
                    out.write(block)
            got = md5sum(tmp)
            if got not in md5s:
                errors.append(f"{url}: md5 {got}, expected one of {list(md5s)}")
                continue
            os.replace(tmp, dest)
            return
        except OSError as exc:  # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))
