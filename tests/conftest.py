"""Shared pytest fixtures. Data fixtures: see ``data_root`` and ``omniglot``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _require_data(path: Path) -> Path:
    """Skip the test if ``path`` is missing; fail instead when the ``CI`` env var is set."""
    if not path.exists():
        msg = (
            f"data not found at {path}; set BILEVEL_DATA to the folder holding MNIST/, "
            "FashionMNIST/ and omniglot/ (default: ../shared/data from the repository root)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def require_data():
    """A function ``require_data(path)``: skip (or, with ``CI`` set, fail) if it is missing."""
    return _require_data


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data folder: ``$BILEVEL_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("BILEVEL_DATA")
    # absolute: the README's BILEVEL_DATA=../shared/data is relative, and file:// URIs are not
    return _require_data((Path(env) if env else REPO_ROOT.parent / "shared" / "data").resolve())


@pytest.fixture(scope="session")
def data_cache_dir(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    """Cache for decoded data: ``$BILEVEL_CACHE``, else pytest's cache folder (kept
    between runs of this checkout), else a fresh temporary folder; one folder per
    pytest-xdist worker."""
    # one folder per pytest-xdist worker: a worker decoding Omniglot would otherwise leave
    # its temporary file where another worker's test checks that none is left
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    env = os.environ.get("BILEVEL_CACHE")
    if env:
        return Path(env) / worker if worker else Path(env)
    name = "bilevel_data" + worker
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def omniglot(data_root: Path, data_cache_dir: Path):
    """All of Omniglot at 28x28, decoded once per checkout (then read from the cache)."""
    from bilevel.data import Omniglot

    _require_data(data_root / "omniglot")
    return Omniglot(data_root, cache_dir=data_cache_dir, progress=False)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the tests single-threaded: the problems are small, and on a busy machine two
    threads per process were measured 10-30x slower than one (oversubscription)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
