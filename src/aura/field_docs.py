"""Attribute docstrings of dataclass fields: the string literal on the line after a field.

Python keeps no per-field documentation at run time, so it is read back from the class source
with ``ast`` (litgpt's convention). One docstring then serves the source reader, ``--help`` and
``aura config show --explain``, instead of three hand-synchronised copies.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    """The field docstrings written in ``cls``'s own body, whitespace collapsed to one line."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source: a class built at run time, or a built-in
        return {}
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring for every field of dataclass ``cls``, in field order.

    The MRO is walked so an inherited field is explained, and a subclass that redefines a field
    with its own docstring overrides the base's; "" for a field no class documents."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}
