"""MkDocs hook: ship MathJax with the site, so that formulas render without the network.

``pymdownx.arithmatex`` (``generic: true``) writes every formula as ``\\( ... \\)`` or
``\\[ ... \\]`` inside an element of class ``arithmatex``; MathJax typesets them in the
reader's browser. Its files come from the PyPI package ``django-static-mathjax`` (MathJax
3.2.2, Apache-2.0, no dependencies; installed by ``pip install -e ".[dev]"``), which holds
the official ``es5`` build. This hook adds the files the pages need to the site, under
``assets/mathjax/``, as generated files (so ``mkdocs serve`` serves them too): the ``tex-svg``
component (TeX in, SVG out: the glyphs are paths inside it, so no web font is loaded) and the
TeX extensions that it loads on demand. ``mkdocs.yml`` loads ``javascripts/mathjax.js`` (the
configuration) and then ``assets/mathjax/tex-svg.js`` from the site itself: no page refers
to a CDN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

TARGET = "assets/mathjax"
#: What the pages use, relative to MathJax's ``es5`` folder.
WANTED = ("tex-svg.js", "input/tex/extensions")


def mathjax_root() -> Path:
    """The ``es5`` folder of the installed MathJax, or a clear error with the cure."""
    spec = importlib.util.find_spec("mathjax")
    for location in (spec.submodule_search_locations or []) if spec else []:
        root = Path(location) / "static" / "mathjax" / "es5"
        if (root / "tex-svg.js").is_file():
            return root
    raise PluginError(
        "MathJax is not installed: the docs render their formulas with the MathJax copy of the "
        'PyPI package django-static-mathjax. Install it with `pip install -e ".[dev]"` (or '
        "`pip install django-static-mathjax`)."
    )


def mathjax_files(root: Path) -> list[Path]:
    """Every file of ``WANTED`` under ``root``."""
    found = []
    for name in WANTED:
        path = root / name
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return found


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add MathJax's files to the site."""
    root = mathjax_root()
    for path in mathjax_files(root):
        uri = f"{TARGET}/{path.relative_to(root).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
