"""Where data sets and caches live.

Nothing here hard-codes a location: the data folder comes from the ``root`` argument or
the ``BILEVEL_DATA`` environment variable, the cache folder from ``cache_dir``, the
``BILEVEL_CACHE`` environment variable, or ``~/.cache/bilevel``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bilevel.data._files import cure_error

__all__ = ["CACHE_ENV", "DATA_ENV", "resolve_cache_dir", "resolve_root"]

#: Environment variable naming the data folder (holds ``MNIST/``, ``omniglot/``, ...).
DATA_ENV = "BILEVEL_DATA"
#: Environment variable naming the folder for derived files (decoded caches).
CACHE_ENV = "BILEVEL_CACHE"


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the data folder.

    Args:
        root: Folder that holds the data sets (``MNIST/``, ``FashionMNIST/``,
            ``omniglot/``). When ``None``, the ``BILEVEL_DATA`` environment variable is used.

    Returns:
        The folder as an absolute, user-expanded path. It is not required to exist.

    Raises:
        ValueError: If ``root`` is empty, or ``None`` and ``BILEVEL_DATA`` is unset, empty or blank.
    """
    if root is None:
        env = os.environ.get(DATA_ENV, "")
        if not env.strip():  # unset, empty or blank: no folder named
            raise cure_error(
                ValueError,
                "no data folder given: {pass_root} or set the {env} environment variable to "
                "the folder that holds the data sets",
                env=DATA_ENV,
            )
        root = env
    elif not os.fspath(root).strip():
        # Path("") is the current folder: a blank argument (an unset shell variable in
        # --data-root "$DIR") would read whatever data lies there
        raise cure_error(
            ValueError,
            "{root} is an empty path (the current folder): name the folder that holds the data "
            "sets, or {default_root} to use the {env} environment variable",
            env=DATA_ENV,
        )
    return Path(root).expanduser().absolute()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder for cached, derived files (it is not created here).

    Args:
        cache_dir: Cache folder. When ``None``, the ``BILEVEL_CACHE`` environment variable
            is used, else ``~/.cache/bilevel`` (``$XDG_CACHE_HOME/bilevel`` when set).

    Returns:
        The folder as an absolute, user-expanded path.
    """
    if cache_dir is None:
        env = os.environ.get(CACHE_ENV, "")
        if env:
            cache_dir = env
        else:
            base = os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache"
            cache_dir = Path(base) / "bilevel"
    return Path(cache_dir).expanduser().absolute()
