"""Labelled tasks derived mechanically from the Python standard library (offline, on every
machine), as JSON records in the formats of data/tasks.py (`data.source=stdlib_task`,
`data.task.derived=NAME`):

- `docstring_package` (classify): the first paragraph of the docstring of each public top-level
  function, class or method (read with `ast`, nothing imported) -> the top-level package it
  comes from, over the PACKAGES below (e.g. `email/utils.py` -> "email").
- `token_types` (tag): each source line of the modules of those packages, cut into `tokenize`
  tokens (comments and layout tokens left out), tagged in BIO: a dotted attribute chain
  (`os.path.join`: NAME . NAME . NAME) is one ATTR entity over its tokens, keywords KW, other
  names NAME, numbers NUM, strings STR; operators are O.
- `signature` (text2text): the first docstring line of each such function or method -> its signature
  `name(arg, arg, *args, **kw)` (defaults left out).

Every record carries `_where` (file:line). The same files give the same records in the same
order, so the split into train and validation (by content hash, data.validation_percent) is fixed.
"""
from __future__ import annotations

import ast
import io
import json
import keyword
import tokenize
from typing import Iterator

from data.sources import Document, stdlib_dir
from errors import DataError

# Packages with many documented top-level functions and classes, and distinct subject matter.
PACKAGES = ("asyncio", "concurrent", "email", "importlib", "json", "multiprocessing", "sqlite3",
            "unittest", "urllib", "xml")
MAX_LINE_TOKENS = 24
DERIVED = ("docstring_package", "token_types", "signature")
TASK_OF = {"docstring_package": "classify", "token_types": "tag", "signature": "text2text"}


def _modules() -> Iterator[tuple[str, str, str]]:
    """(package, path relative to the stdlib, source) of each module of PACKAGES."""
    root = stdlib_dir()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if {"test", "tests", "__pycache__"} & set(rel.parts):
                continue
            yield package, rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _definitions(source: str) -> Iterator[ast.AST]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                not node.name.startswith("_"):
            if ast.get_docstring(node):
                yield node
            if isinstance(node, ast.ClassDef):   # and its public documented methods
                yield from (m for m in node.body if isinstance(m, (ast.FunctionDef,
                            ast.AsyncFunctionDef)) and not m.name.startswith("_")
                            and ast.get_docstring(m))


def _record(where: str, **fields) -> Document:
    return where, json.dumps({**fields, "_where": where}, ensure_ascii=False, sort_keys=True)


def docstring_package() -> Iterator[Document]:
    for package, rel, source in _modules():
        for node in _definitions(source):
            paragraph = ast.get_docstring(node).split("\n\n")[0]
            text = " ".join(paragraph.split())
            if len(text) >= 12:
                yield _record(f"stdlib/{rel}:{node.lineno}", text=text, label=package)


def _plain_name(tok: tokenize.TokenInfo) -> bool:
    return tok.type == tokenize.NAME and not keyword.iskeyword(tok.string)


def _tag_line(tokens: list[tokenize.TokenInfo]) -> tuple[list[str], list[str]]:
    words, tags = [], []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        chain = i
        while (chain + 2 < len(tokens) and _plain_name(tokens[chain])
               and tokens[chain + 1].string == "." and _plain_name(tokens[chain + 2])):
            chain += 2
        if chain > i:
            for j, t in enumerate(tokens[i:chain + 1]):
                words.append(t.string)
                tags.append("B-ATTR" if j == 0 else "I-ATTR")
            i = chain + 1
            continue
        if tok.type == tokenize.NAME:
            tag = "B-KW" if keyword.iskeyword(tok.string) else "B-NAME"
        elif tok.type == tokenize.NUMBER:
            tag = "B-NUM"
        elif tok.type == tokenize.STRING:
            tag = "B-STR"
        else:
            tag = "O"
        words.append(tok.string)
        tags.append(tag)
        i += 1
    return words, tags


_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}


def token_types() -> Iterator[Document]:
    for _, rel, source in _modules():
        by_line: dict[int, list[tokenize.TokenInfo]] = {}
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type not in _SKIP and tok.start[0] == tok.end[0] and \
                        not any(c.isspace() for c in tok.string):
                    by_line.setdefault(tok.start[0], []).append(tok)
        except (tokenize.TokenError, SyntaxError):
            continue
        for line, tokens in sorted(by_line.items()):
            if 3 <= len(tokens) <= MAX_LINE_TOKENS:
                words, tags = _tag_line(tokens)
                yield _record(f"stdlib/{rel}:{line}", tokens=words, tags=tags)


def _signature(node: ast.FunctionDef) -> str:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return f"{node.name}({', '.join(names)})"


def signature() -> Iterator[Document]:
    for _, rel, source in _modules():
        for node in _definitions(source):
            if isinstance(node, ast.ClassDef):
                continue
            first = ast.get_docstring(node).strip().splitlines()[0].strip()
            if len(first) >= 8:
                yield _record(f"stdlib/{rel}:{node.lineno}", input=first,
                              target=_signature(node))


def documents(name: str) -> Iterator[Document]:
    """The records of derived task `name` (see the module docstring)."""
    makers = {"docstring_package": docstring_package, "token_types": token_types,
              "signature": signature}
    if name not in makers:
        raise DataError(f"data.task.derived={name!r}: choose one of {DERIVED}")
    return makers[name]()
