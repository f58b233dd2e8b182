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
