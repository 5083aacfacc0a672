"""The documentation cannot rot: its code runs, its API reference lists every export, its
cross-references resolve, and its mathematics renders without the network.

- Every ```` ```python ```` block that follows a ``<!-- test -->`` comment in ``docs/*.md`` runs,
  in page order, in one namespace per page, in a temporary folder, with warnings as errors.
- A fragment (a block that uses names a page leaves to the reader: ``ll_objective``,
  ``ll_model``) follows ``<!-- test with NAME -->`` and runs alone, with warnings as errors,
  in a namespace that ``SETUPS[NAME]`` builds (``tests/doc_setups.py``); this covers
  ``README.md`` too. Another project's code (``migrating.md``'s peers) follows
  ``<!-- peer code: not run here -->``. Every ```` ```python ```` block has one of the three.
- ``docs/api.md`` has an entry for every name that ``bilevel``, ``bilevel.ll`` and
  ``bilevel.ul`` export.
- The Sphinx roles of the docstrings become cross-references (``docs/hooks/sphinx_roles.py``)
  to objects that the API reference renders.
- MathJax is shipped with the site (``docs/hooks/offline_math.py``) and no page loads anything
  from another host; with Chromium installed, the formulas of two pages are typeset
  (``docs/screenshots.py`` does it for every page, with screenshots).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "hooks"))
sys.path.insert(0, str(DOCS))

TESTED = re.compile(r"<!-- test -->\s*\n```python\n(.*?)\n```", re.S)
FRAGMENT = re.compile(r"<!-- test with (\w+) -->\s*\n```python\n(.*?)\n```", re.S)
PEER = "<!-- peer code: not run here -->"
MARKERS = re.compile(r"(<!-- (?:test|test with \w+|peer code: not run here) -->\s*\n)?```python\n")
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
DIRECTIVE = re.compile(r"^::: *([\w.]+)", re.M)
#: Entries of docs/api.md rendered with ``show_if_no_docstring: true``.
ALL_SHOWN = ("bilevel.ll.rules",)


def marked_blocks(page: Path) -> list[str]:
    """The code of the blocks marked ``<!-- test -->`` on ``page``, in order."""
    return TESTED.findall(page.read_text())


def pages_with_tests() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if marked_blocks(p))


def test_pages_have_marked_blocks() -> None:
    """The pages whose code is promised to run have some (a typo in the marker would silently
    skip them)."""
    assert {"quickstart.md", "migrating.md"} <= set(pages_with_tests())
    for page in DOCS.glob("*.md"):
        markers = page.read_text().count("<!-- test -->")
        assert markers == len(marked_blocks(page)), f"{page.name}: a marker not before ```python"


@pytest.mark.parametrize("page", pages_with_tests())
def test_snippets_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's tested blocks run top to bottom, float64, every warning an error."""
    monkeypatch.chdir(tmp_path)
    dtype = torch.get_default_dtype()
    namespace: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for i, code in enumerate(marked_blocks(DOCS / page)):
                try:
                    exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
                except Exception as error:
                    raise AssertionError(f"{page}, tested block {i} failed: {error!r}") from error
    finally:
        torch.set_default_dtype(dtype)


def fragments() -> list[tuple[str, int, str, str]]:
    """``(page, index, setup name, code)`` of every fragment of the pages and the README."""
    return [
        (page.name, i, name, code)
        for page in PAGES
        for i, (name, code) in enumerate(FRAGMENT.findall(page.read_text()))
    ]


def test_every_python_block_is_run_or_said_not_to_be() -> None:
    """No ```` ```python ```` block escapes: each is tested, a fragment with a setup, or
    another project's code; and every fragment names a setup that exists."""
    from doc_setups import SETUPS

    for page in PAGES:
        unmarked = [m.start() for m in MARKERS.finditer(page.read_text()) if not m.group(1)]
        lines = [page.read_text()[:at].count("\n") + 1 for at in unmarked]
        assert not lines, f"{page.name}: python blocks at lines {lines} have no marker"
    assert {name for _, _, name, _ in fragments()} <= set(SETUPS)
    assert len(fragments()) >= 6


@pytest.mark.parametrize(
    "page, index, setup, code", fragments(), ids=[f"{p}-{i}" for p, i, _, _ in fragments()]
)
def test_fragments_run(page: str, index: int, setup: str, code: str, tmp_path: Path, monkeypatch):
    """The fragment runs, float64, every warning an error, with the names its page leaves to
    the reader defined by its setup."""
    from doc_setups import SETUPS

    monkeypatch.chdir(tmp_path)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        namespace = SETUPS[setup]()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(compile(code, f"{page}[fragment {index}]", "exec"), namespace)
            namespace["check"](namespace)
    finally:
        torch.set_default_dtype(dtype)


def documented_paths() -> list[str]:
    return DIRECTIVE.findall((DOCS / "api.md").read_text())


@pytest.mark.parametrize("module", ["bilevel", "bilevel.ll", "bilevel.ul"])
def test_api_reference_lists_every_export(module: str) -> None:
    """Each exported name has a ``::: path`` entry in docs/api.md, under the name it is
    exported as or the module that defines it."""
    paths = set(documented_paths())
    exported = importlib.import_module(module)
    missing = []
    for name in exported.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(exported, name)
        where = getattr(obj, "__module__", None)
        candidates = {f"{module}.{name}", f"{where}.{name}"}
        if isinstance(obj, type(sys)):  # an exported module
            candidates.add(obj.__name__)
        if not candidates & paths:
            missing.append(name)
    assert not missing, (
        f"docs/api.md has no entry for {module}.{', '.join(missing)}: add "
        + ", ".join(f"'::: {module}.{n}'" for n in missing)
    )


def load_with_roles():
    """The package as mkdocstrings loads it, with the role-converting extension."""
    import griffe
    from sphinx_roles import SphinxRoles

    extensions = griffe.load_extensions(SphinxRoles())
    return griffe.load("bilevel", extensions=extensions, search_paths=[str(ROOT)])


def rendered(package, paths: list[str]) -> list[str]:
    """The canonical paths of the API reference's entries."""
    found = []
    for path in paths:
        obj = package.modules_collection.get_member(path)
        found.append(obj.final_target.path if obj.is_alias else obj.path)
    return found


def test_sphinx_roles_become_links_to_rendered_objects() -> None:
    """No docstring keeps a Sphinx role; every cross-reference of a docstring the API
    reference shows names an object it shows (otherwise the link would not resolve)."""
    import griffe
    from sphinx_roles import ROLE, objects

    package = load_with_roles()
    roots = rendered(package, documented_paths())

    def inside(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") for r in roots)

    def private(path: str) -> bool:
        return any(p.startswith("_") and not p.startswith("__") for p in path.split("."))

    shown = [o for o in objects(package) if inside(o.path) and not private(o.path)]
    broken, left = [], []
    for obj in shown:
        text = obj.docstring.value if obj.docstring else ""
        left += [f"{obj.path}: {m.group(0)}" for m in ROLE.finditer(text)]
        for target in re.findall(r"\]\[([\w.]+)\]", text):
            try:
                found = package.modules_collection.get_member(target)
            except (KeyError, ValueError, griffe.AliasResolutionError):
                broken.append(f"{obj.path} -> {target} (no such object)")
                continue
            final = found.final_target if found.is_alias else found
            if not inside(final.path):
                broken.append(f"{obj.path} -> {target} (not in docs/api.md)")
            elif final.docstring is None and not any(final.path.startswith(p) for p in ALL_SHOWN):
                # mkdocstrings shows no member without a docstring (show_if_no_docstring)
                broken.append(f"{obj.path} -> {target} (has no docstring, so is not shown)")
    assert not left, f"roles left raw: {left}"
    assert not broken, f"cross-references that would not link: {broken}"


def test_roles_conversion() -> None:
    """The conversion itself, on the forms Sphinx allows."""
    import griffe
    from sphinx_roles import convert

    package = load_with_roles()
    obj = package["problem.BilevelProblem"]
    text = (
        ":meth:`step`, :class:`~bilevel.ll.Trajectory`, :func:`torch.autograd.grad`, "
        ":class:`the runner <bilevel.BilevelProblem>`, layout::\n\n    code\n"
    )
    assert convert(text, obj) == (
        "[`step`][bilevel.problem.BilevelProblem.step], [`Trajectory`][bilevel.ll.Trajectory], "
        "`torch.autograd.grad`, [`the runner`][bilevel.BilevelProblem], layout:\n\n    code\n"
    )
    assert isinstance(obj, griffe.Class)


def test_mathjax_is_shipped_with_the_site() -> None:
    """The renderer's files come from an installed package, the pages load them from the site
    itself, and the configuration names no other host."""
    import yaml
    from offline_math import mathjax_files, mathjax_root

    files = mathjax_files(mathjax_root())
    assert any(f.name == "tex-svg.js" for f in files)
    text = (ROOT / "mkdocs.yml").read_text()
    config = yaml.load(text, Loader=yaml.BaseLoader)
    assert config["extra_javascript"] == ["javascripts/mathjax.js", "assets/mathjax/tex-svg.js"]
    assert "docs/hooks/offline_math.py" in config["hooks"]
    assert config["theme"]["font"] == "false"  # no font service
    assert "http" not in " ".join(config["extra_javascript"] + config.get("extra_css", []))


def test_benchmark_pages_name_no_temporary_file() -> None:
    """Commands to reproduce a result must work on another machine."""
    for page in DOCS.glob("*.md"):
        assert not re.search(r"python \S+ .*?/tmp/", page.read_text()), page.name


@pytest.mark.skipif(
    not any(
        subprocess.run(["which", b], capture_output=True).returncode == 0
        for b in ("chromium", "chromium-browser", "google-chrome")
    ),
    reason="Chromium is not installed",
)
def test_formulas_render_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium, no network: the formulas of two pages are typeset, none is left raw,
    and nothing is requested from another host (``docs/screenshots.py`` checks every page)."""
    import screenshots

    site = tmp_path / "site"
    screenshots.build(site, strict=False)
    report = screenshots.check_site(
        site, tmp_path / "png", pages=["", "troubleshooting/"], screenshots=False
    )
    assert not report["problems"], report["problems"]
    assert report["pages"][""]["mathjax"] >= 1
    assert report["pages"]["troubleshooting/"]["mathjax"] >= 5


def test_every_export_of_bilevel_data_has_a_docstring_to_render() -> None:
    """``::: bilevel.data`` renders the members that have a docstring: the md5 tables and the
    split sizes had ``#:`` comments, which griffe does not read, and were left off the API
    page."""
    data = load_with_roles()["data"]
    undocumented = [
        name for name in importlib.import_module("bilevel.data").__all__
        if not data[name].docstring
    ]  # fmt: skip
    assert not undocumented, f"bilevel.data exports without a docstring: {undocumented}"
