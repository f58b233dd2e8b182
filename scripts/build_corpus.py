#!/usr/bin/env python3
"""Builds data/stdlib_docstrings.jsonl: English text from the Python standard library.

Every machine with Python has the standard library, so the demo's data set needs no
download. Docstrings of modules, classes and functions are extracted with ``ast`` (no
module is imported), cleaned, de-duplicated and written one JSON object per line with a
``text`` field, in a fixed order. Idempotent: an up-to-date file is left alone.

Usage: python scripts/build_corpus.py [--out data/stdlib_docstrings.jsonl] [--max-mb 3]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def iter_nodes(root: Path):
    """Every AST node of the standard library's sources below ``root``, in a fixed order
    (files parsed, never imported; tests and tools skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, fn).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield from ast.walk(tree)


def already_built(out: Path) -> bool:
    """Whether ``out`` exists and is not empty (then it is left alone: the builds are idempotent)."""
    if out.is_file() and out.stat().st_size > 0:
        print(f"{out} exists ({out.stat().st_size / 1e6:.1f} MB); leaving it")
        return True
    return False


def iter_docstrings(root: Path):
    for node in iter_nodes(root):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/stdlib_docstrings.jsonl")
    ap.add_argument("--max-mb", type=float, default=3.0)
    ap.add_argument("--min-chars", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    if already_built(out):
        return
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    budget = int(args.max_mb * 1e6)
    size = docs = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in iter_docstrings(root):
            doc = inspect.cleandoc(doc)
            if len(doc) < args.min_chars or doc in seen or not doc.isascii():
                continue
            seen.add(doc)
            line = json.dumps({"text": doc}, ensure_ascii=False)
            f.write(line + "\n")
            size += len(line) + 1
            docs += 1
            if size >= budget:
                break
    os.replace(tmp, out)
    print(f"wrote {out}: {docs} documents, {size / 1e6:.2f} MB from {root}")


if __name__ == "__main__":
    main()
