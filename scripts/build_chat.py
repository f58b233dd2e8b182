#!/usr/bin/env python3
"""Builds data/stdlib_chat.jsonl: a small chat set for configs/chat.yaml, from the Python standard library.

Each row is a conversation (``messages``: a user turn and an assistant turn) asking for a
transformation of a function name found in the standard library (parsed with ``ast``; no
module is imported, nothing is downloaded): upper case, snake_case to CamelCase, reversed,
or the count of its underscores. The tasks are rule-based, so a small model visibly learns
them, and the loss on the assistant's tokens says how well. Fixed order; idempotent.

Usage: python scripts/build_chat.py [--out data/stdlib_chat.jsonl] [--rows 4000]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sysconfig
from pathlib import Path

from build_corpus import already_built, iter_nodes  # scripts/ is on sys.path when this file runs

TASKS = [
    ("Write {name} in upper case.", lambda n: n.upper()),
    ("Convert {name} from snake_case to CamelCase.", lambda n: "".join(p[:1].upper() + p[1:] for p in n.split("_") if p)),
    ("Reverse the letters of {name}.", lambda n: n[::-1]),
    ("How many underscores are in {name}?", lambda n: str(n.count("_"))),
]


def function_names(root: Path) -> list[str]:
    names: set[str] = set()
    for node in iter_nodes(root):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.name.strip("_")
            if 4 <= len(n) <= 24 and n.isascii() and n.replace("_", "").isalpha() and n.islower():
                names.add(n)
    return sorted(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/stdlib_chat.jsonl")
    ap.add_argument("--rows", type=int, default=4000)
    args = ap.parse_args()
    out = Path(args.out)
    if already_built(out):
        return
    names = function_names(Path(sysconfig.get_paths()["stdlib"]))
    rng = random.Random(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(args.rows):
            name = rng.choice(names)
            prompt, answer = TASKS[i % len(TASKS)]
            messages = [{"role": "user", "content": prompt.format(name=name)},
                        {"role": "assistant", "content": answer(name)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {args.rows} conversations over {len(names)} function names")


if __name__ == "__main__":
    main()
