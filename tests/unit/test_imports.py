"""The core is pure torch: importing it loads no heavy dependency."""

import subprocess
import sys


def test_core_imports_no_heavy_dependency():
    code = (
        "import sys, raclora_dist.core, raclora_dist.config\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'bitsandbytes', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_quant_package_imports_bitsandbytes():
    """bitsandbytes stays at the edge: one module imports it (and registers the 4-bit layer)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "raclora_dist"
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "bitsandbytes" for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"quant/bnb.py"}
