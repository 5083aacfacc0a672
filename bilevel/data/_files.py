"""Private helpers: md5 sums, MD5SUMS files, verified downloads, and the messages of the
data loaders' errors, whose cures a command line can name with its own options."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["CURE_ARGUMENTS", "damaged", "download_file", "md5sum", "read_md5sums", "reword"]

CURE_ARGUMENTS = {
    "root": "root",
    "pass_root": "pass root=",
    "default_root": "pass root=None",
    "download": "pass download=True",
    "no_check_md5": "pass check_md5=False",
    "cache_dir": "pass cache_dir=",
}
"""How the data loaders' messages name the arguments that cure a problem, as a caller of the
library spells them: ``{download}`` in a message reads "pass download=True". A command line
over the loaders names its own options instead with :func:`reword`."""

_E = TypeVar("_E", bound=BaseException)


def cure_error(kind: type[_E], template: str, /, **values: Any) -> _E:
    """``kind(message)``: ``template`` with the cures spelled as :data:`CURE_ARGUMENTS` says
    and ``values`` filled in. The template and values stay on the error (or warning), so that
    :func:`reword` can spell its cures otherwise."""
    error = kind(template.format_map({**CURE_ARGUMENTS, **values}))
    error._cure_template = (template, values)  # type: ignore[attr-defined]
    return error


def damaged(path: Any, what: str, data: str, also: str = "") -> ValueError:
    """The error for a data file at ``path`` that cannot be used (``what``): damaged, or not
    ``data``; the cure is a fresh download (and ``also``, another cure)."""
    return cure_error(
        ValueError,
        "{path}: {what}: the data is damaged or not {data}. Delete it and download it again "
        "({download}){also}.",
        path=path,
        what=what,
        data=data,
        also=also,
    )


def reword(error: BaseException, arguments: Mapping[str, str]) -> str:
    """The message of a data loader's error or warning, its cures named by ``arguments``.

    A command line over the loaders cannot act on "pass download=True": it maps the keys of
    :data:`CURE_ARGUMENTS` to its own options (``{"download": "add --download", ...}``) and
    reports ``reword(error, those)``. Keys left out keep the library's spelling; an error
    whose message names no argument is returned as ``str(error)``.

    Args:
        error: An exception or warning raised by :mod:`bilevel.data`.
        arguments: The phrases that replace those of :data:`CURE_ARGUMENTS`.

    Returns:
        The message.
    """
    kept = getattr(error, "_cure_template", None)
    if kept is None:
        return str(error)
    template, values = kept
    return template.format_map({**CURE_ARGUMENTS, **arguments, **values})


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
