"""Griffe extension: Sphinx roles in docstrings become cross-references that link.

The library's docstrings name other objects the Sphinx way (``:class:`Implicit```,
``:meth:`step```, ``:func:`~bilevel.linalg.cg```), which mkdocstrings would show raw. When
mkdocstrings loads the package, this extension rewrites every docstring before it is parsed:

- a role whose target resolves (in the scope of the documented object, as Python would:
  its members, its parents' members, the module's imports) to an object of the library
  becomes the Markdown cross-reference ``[`name`][full.path]``, which mkdocs-autorefs turns
  into a link; a target that is not rendered in the API reference makes the strict build
  fail ("Could not find cross-reference target"), so a broken reference cannot land;
- a role naming something outside the library (``torch.nn.Module``) becomes inline code:
  there is no offline inventory to link it to;
- a role whose target resolves nowhere also becomes a cross-reference, to the name as
  written, so that the strict build fails on it too;
- a reStructuredText literal-block marker (a paragraph ending in ``::``) becomes ``:``.

``tests/test_docs.py`` loads the package with this extension and checks that no role is left
and that every cross-reference names an object of the library.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: The roles of Sphinx's Python domain (with or without the ``py:`` prefix).
ROLE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|attr|mod|data|exc|obj|const|type|property)"
    r":`(?P<body>[^`]+)`"
)
#: A paragraph that ends in ``::`` (reST's literal-block marker), followed by a blank line.
LITERAL = re.compile(r"(?<=\S)::(?=\n\s*\n)")
#: Top-level packages documented by the site: anything else is not linked.
DOCUMENTED = ("bilevel",)


def split_body(body: str) -> tuple[str, str]:
    """``(title, target)`` of a role's body: ``~a.b.C`` shows ``C``, ``text <a.b>`` shows
    ``text``, ``a.b.C()`` (a call) targets ``a.b.C``."""
    explicit = re.fullmatch(r"(?P<title>.*?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        return explicit["title"], explicit["target"].lstrip("~!.")
    target = body.lstrip("!.")
    if target.startswith("~"):
        target = target[1:]
        title = target.rsplit(".", 1)[-1]
    else:
        title = target
    return title, target.removesuffix("()")


def resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` seen from ``obj`` (as Python's scoping would find it), or
    ``None`` when it resolves nowhere."""
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            base = scope.resolve(head)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        return f"{base}.{rest}" if rest else base
    return None


def exists(modules: griffe.ModulesCollection, path: str) -> bool:
    """Whether ``path`` names an object (or an alias) that griffe loaded."""
    try:
        modules.get_member(path)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def convert(text: str, obj: griffe.Object) -> str:
    """``text`` with its Sphinx roles as Markdown cross-references (or code)."""

    def replace(match: re.Match[str]) -> str:
        title, target = split_body(match["body"])
        path = resolve(obj, target) or target
        if path.split(".", 1)[0] not in DOCUMENTED:
            return f"`{title}`"
        return f"[`{title}`][{path}]"

    return LITERAL.sub(":", ROLE.sub(replace, text))


def objects(root: griffe.Object) -> list[griffe.Object]:
    """``root`` and every object defined under it (aliases excluded: they have no docstring of
    their own)."""
    found, stack = [], [root]
    while stack:
        obj = stack.pop()
        found.append(obj)
        stack += [m for m in obj.members.values() if not m.is_alias]
    return found


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring of a loaded package (see the module)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Convert every docstring of the package once it is fully loaded (so that names
        imported from later modules resolve)."""
        for obj in objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
