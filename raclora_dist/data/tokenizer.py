"""Tokenizers: a built-in byte-level one (no files, no hub) or a local tokenizer folder."""

from __future__ import annotations

from functools import lru_cache

EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (so byte-level BPE can hold bytes)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=False)}


def byte_tokenizer():
    """A 257-token tokenizer: ids 0-255 are bytes, 256 is ``<|endoftext|>`` (eos/bos/pad).

    Returns a ``PreTrainedTokenizerFast``; ``save_pretrained`` makes a folder that
    ``AutoTokenizer.from_pretrained`` loads with no raclora code.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_source(cfg) -> str:
    """What ``data.tokenizer`` names, its default resolved where the run reads it: unset means
    the model folder's own tokenizer if the folder has one, else ``"bytes"``.

    Resolved here rather than in the config: a config is validated on machines that may not
    hold the model (a laptop rendering manifests for a cluster), and validation reads no disk.
    """
    from raclora_dist.data.sources import kind, local_folder

    named = cfg.data.tokenizer
    if named is not None:
        return named if named == "bytes" or kind(named) == "path" else str(
            local_folder(named, field="data.tokenizer", weights=False))
    if cfg.model.name_or_path is None:
        return "bytes"
    folder = local_folder(cfg.model.name_or_path, weights=False)  # a Hub name or URI: fetched
    own = any((folder / f).is_file() for f in TOKENIZER_FILES)
    return (cfg.model.name_or_path if kind(cfg.model.name_or_path) == "path" else str(folder)) if own else "bytes"


def load_tokenizer(spec: str):
    """``"bytes"`` -> :func:`byte_tokenizer`; otherwise a local folder via ``AutoTokenizer``."""
    if spec == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer: the tokenizer in {spec!r} has no eos token to separate documents")
    return tok
