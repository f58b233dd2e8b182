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


# Each package imports only packages below it (docs/design.md's map); logs.py is stdlib only.
LAYERS = [{"logs", "files", "core", "config_version", "config_files"}, {"quant"}, {"config"}, {"backends", "data"},
          {"checkpoint"}, {"observe"}, {"model"}, {"train"}, {"orchestration"}, {"cli"}, {"__main__"}]


def test_packages_import_only_the_layers_below_them():
    """Every import, lazy ones inside functions included: the dependency direction holds."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "raclora_dist"
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        src = rel[0] if len(rel) > 1 else path.stem
        if src == "__init__":
            continue
        assert src in rank, f"{src}: a new package; place it in LAYERS (and in docs/design.md's map)"
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for mod in mods:
                parts = mod.split(".")
                if parts[0] == "raclora_dist" and len(parts) > 1 and parts[1] != src and rank[parts[1]] >= rank[src]:
                    wrong.append(f"{path.relative_to(root)} imports {mod}")
    assert not wrong, wrong


def test_every_name_the_benchmarks_and_scripts_import_from_the_package_exists():
    """Benchmarks and scripts import lazily, inside functions, so a renamed helper breaks them
    only when they run (the long-chain benchmark's PEFT cases once imported a removed one)."""
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    missing = []
    for path in [*(root / "benchmarks").rglob("*.py"), *(root / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("raclora_dist"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        missing.append(f"{path.relative_to(root)}: {node.module}.{alias.name}")
    assert not missing, missing
