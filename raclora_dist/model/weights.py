"""Streamed base weights: where a base model's tensors come from, and how a part of a model
built on the meta device is made real from them, one tensor at a time.

A *source* hands out full tensors by their Hugging Face state-dict key:

* :class:`SafetensorsFolder` reads a (sharded) safetensors checkpoint through memory maps,
  so a tensor costs memory only while the caller holds it;
* :class:`InitFromConfig` initialises a model built from its config, each module from its own
  seed ``(init_seed, module name)``. A config-built base is therefore a pure function of
  ``(config, init_seed)``: the same bits whether it is built whole, module by module, or
  shard by shard on several ranks, in any order.

:func:`materialize` turns the meta tensors of one :class:`LoadUnit` into real ones on a
device; :func:`write_safetensors` streams a source into a sharded safetensors folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from raclora_dist.config import ConfigError

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightSource(Protocol):
    """Full tensors by state-dict key, one at a time (CPU tensors, in the stored dtype)."""

    def keys(self) -> set[str]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...


# -- a folder of safetensors ------------------------------------------------------------
class SafetensorsFolder:
    """A Hugging Face checkpoint folder: ``model.safetensors`` or shards named by
    ``model.safetensors.index.json``.

    A tensor read is a private (copy-on-write) map of its bytes in the file: nothing is read
    until it is used, a tensor dropped (sharded, quantized) frees its pages, and writing to
    one (a merge into the base) never touches the file. Processes reading the same file (DDP
    replicas on one node) share its pages in the page cache until they write. No file handle
    is kept between reads.

    Args:
        folder: the checkpoint folder.
        bar: show a progress bar per shard file (interactive terminals).
    """

    def __init__(self, folder: str | Path, bar: bool = False) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)  # safe_open is not iterable
        else:
            raise ConfigError(f"model.name_or_path: {str(self.folder)!r} holds neither {SINGLE} nor {INDEX} "
                              "(a safetensors checkpoint is needed)")
        self.files = sorted(set(self.weight_map.values()))
        for file in self.files:
            if not (self.folder / file).is_file():
                raise ConfigError(f"model.name_or_path: {INDEX} names {file!r}, which is missing from {str(self.folder)!r}")
        self._left = {f: sum(v == f for v in self.weight_map.values()) for f in self.files}
        self._bars: dict[str, Any] = {}  # file -> tqdm bar
        self._t0: dict[str, float] = {}
        self.bar = bar
        self.read: set[str] = set()

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        """One tensor (mapped from its file, see the class docstring)."""
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._t0:
            self._start(file)
        with safe_open(str(self.folder / file), framework="pt") as handle:
            t = handle.get_tensor(key)
        if key not in self.read:
            self.read.add(key)
            self._advance(file)
        return t

    def _start(self, file: str) -> None:
        self._t0[file] = time.perf_counter()
        if self.bar:
            from tqdm import tqdm

            self._bars[file] = tqdm(total=self._left[file], desc=f"loading {file}", unit="tensor", leave=False)

    def _advance(self, file: str) -> None:
        self._left[file] -= 1
        if file in self._bars:
            self._bars[file].update(1)
        if self._left[file] == 0:  # every tensor of this file was read
            if file in self._bars:
                self._bars.pop(file).close()
            done = sum(1 for f in self.files if self._left[f] == 0)
            logger.info(f"loaded {file} ({done}/{len(self.files)}) in {time.perf_counter() - self._t0[file]:.1f} s")

    def close(self) -> None:
        for b in self._bars.values():
            b.close()
        self._bars.clear()


# -- a model built from its config ------------------------------------------------------
def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for initialising module ``name`` (a hash, so neighbours are uncorrelated)."""
    digest = hashlib.blake2b(f"init\x1f{seed}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class InitFromConfig:
    """Tensors of a freshly initialised model, computed on demand.

    Each module's tensors come from the model's own ``_init_weights`` run on a CPU copy of
    that module under the seed :func:`module_seed` ``(init_seed, module name)``, so a tensor
    does not depend on which others were asked for before it.

    Args:
        model: the model on the meta device (a private copy is kept; the caller's may change).
        init_seed: ``model.init_seed``.
    """

    def __init__(self, model: nn.Module, init_seed: int) -> None:
        self.model = copy.deepcopy(model)
        self.seed = init_seed
        # A tied tensor answers to each of its names with the value of its first owner (the
        # input embedding for a tied output head), as transformers' tie_weights leaves it.
        self._canonical: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, t in [*self.model.named_parameters(remove_duplicate=False),
                        *self.model.named_buffers(remove_duplicate=False)]:
            self._canonical[name] = first.setdefault(id(t), name)
        self._cache: tuple[str, nn.Module] | None = None

    def keys(self) -> set[str]:
        return set(self._canonical)

    @torch.no_grad()
    def get(self, key: str) -> torch.Tensor:
        owner, _, attr = self._canonical[key].rpartition(".")
        if self._cache is None or self._cache[0] != owner:
            meta = self.model.get_submodule(owner)
            module = copy.copy(meta)  # shallow: only this module's own tensors are made real
            module._parameters = {k: None if p is None else nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False)
                                  for k, p in meta._parameters.items()}
            module._buffers = {k: None if b is None else torch.empty_like(b, device="cpu") for k, b in meta._buffers.items()}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(self.seed, owner))
                self.model._init_weights(module)  # type: ignore[operator]  # a PreTrainedModel's
            self._cache = (owner, module)
        t = getattr(self._cache[1], attr)
        return t.detach()

    def close(self) -> None:
        self._cache = None


# -- making a unit of a meta model real ------------------------------------------------------
@dataclass
class LoadUnit:
    """A part of the model loaded (and, under a sharding engine, sharded) in one go.

    Attributes:
        name: the module's qualified name ('' for the root).
        module: the module.
        recurse: the whole subtree (a decoder block), or only the module's own tensors.
        own_unit: sharding engines shard it as a unit of its own (a decoder block, an
            untied embedding or output head), so it is never held whole next to the others.
    """

    name: str
    module: nn.Module
    recurse: bool
    own_unit: bool

    def module_names(self, model: nn.Module) -> list[str]:
        """Qualified names of the modules this unit covers, in model order."""
        if not self.recurse:
            return [self.name]
        prefix = self.name + "."
        return [n for n, _ in model.named_modules() if n == self.name or n.startswith(prefix)]


def load_units(model: nn.Module, blocks: list[nn.Module]) -> list[LoadUnit]:
    """The model split into load units, in model order: every decoder block, then each
    other module that owns tensors directly (embeddings, final norm, head, rotary buffers).

    Args:
        blocks: the repeated decoder blocks (HF ``_no_split_modules``).
    """
    owners = tensor_owners(model)
    block_ids = {id(b) for b in blocks}
    units: list[LoadUnit] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if id(module) in block_ids:
            units.append(LoadUnit(name, module, recurse=True, own_unit=True))
            inside.append(name + ".")
            continue
        own = [p for p in module._parameters.values() if p is not None]
        if own or any(b is not None for b in module._buffers.values()):
            shared = any(len(owners[id(p)]) > 1 for p in own)
            big = isinstance(module, nn.Embedding) or module is _output_head(model)
            units.append(LoadUnit(name, module, recurse=False, own_unit=bool(own) and big and not shared))
    return units


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def tensor_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(tensor) -> [(module name, attribute)]`` for every parameter and buffer; a tied
    tensor has several owners.

    Names, not modules: a module replaced while loading (a linear layer quantized to 4 bits)
    must not be kept alive, with its full-precision weight, by this map.
    """
    out: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                out.setdefault(id(t), []).append((name, attr))
    return out


def _key(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


@torch.no_grad()
def materialize(model: nn.Module, unit: LoadUnit, source: WeightSource, device: torch.device,
                owners: dict[int, list[tuple[str, str]]]) -> None:
    """Makes the meta tensors of ``unit`` real on ``device`` (in place), one at a time.

    Parameters and persistent buffers come from ``source`` (cast to the dtype the model was
    built in); non-persistent buffers (rotary frequencies) are computed by the model's own
    init. A tied tensor is made real once and set on every module that shares it.

    Args:
        owners: :func:`tensor_owners` of ``model`` taken while it was all on meta.

    Raises:
        ConfigError: the source lacks a tensor the model needs (names it and a few more).
    """
    keys = source.keys()
    missing: list[str] = []
    for module_name in unit.module_names(model):
        module = model.get_submodule(module_name) if module_name else model
        needs_init = False
        for attr, b in list(module._buffers.items()):
            if b is None:
                continue
            if not b.is_meta:
                module._buffers[attr] = b.to(device)
            elif attr in module._non_persistent_buffers_set:
                module._buffers[attr] = torch.empty_like(b, device=device)
                needs_init = True
        if needs_init:  # e.g. rotary inv_freq: derived from the config, never stored
            _init_buffers(model, module)
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or not t.is_meta:
                continue
            sharing = owners.get(id(t), [(module_name, attr)])
            names = [_key(n, a) for n, a in sharing]
            key = next((k for k in names if k in keys), None)
            if key is None:
                missing.append(names[0])
                continue
            value = source.get(key)
            value = value.to(device=device, dtype=t.dtype if value.is_floating_point() else value.dtype)
            new = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
            for n, a in sharing:
                mod = model.get_submodule(n) if n else model
                if isinstance(new, nn.Parameter):
                    mod._parameters[a] = new
                else:
                    mod._buffers[a] = new
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"model weights: the checkpoint lacks {shown} (is it a checkpoint of this architecture?)")


def _init_buffers(model: nn.Module, module: nn.Module) -> None:
    """Runs the model's init on ``module``'s buffers only (a shallow view without its
    parameters, which may already hold loaded values)."""
    view = copy.copy(module)
    view._parameters = {}
    model._init_weights(view)  # type: ignore[operator]  # a PreTrainedModel's


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (empty once loaded)."""
    out = [n for n, p in model.named_parameters() if p.is_meta]
    return out + [n for n, b in model.named_buffers() if b.is_meta]


# -- writing a sharded safetensors folder, one tensor at a time ---------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(source: WeightSource, shapes: dict[str, tuple[torch.Size, torch.dtype]], folder: Path,
                      max_shard_bytes: int = 2**30) -> list[Path]:
    """Writes ``source``'s tensors as a sharded safetensors folder with an index.

    Each file's header is written first (shapes and dtypes are known up front), then its
    tensors one by one, so at most one tensor is in memory. The result loads with
    ``safetensors.safe_open`` and ``transformers``' ``from_pretrained``.

    Args:
        shapes: ``key -> (shape, dtype)`` of what to write, in order (e.g. a meta model's state dict).
        max_shard_bytes: a file is closed once it would pass this size (a larger tensor gets a file alone).

    Returns:
        The files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for key, (shape, dtype) in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    n = len(groups)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, keys in zip(names, groups, strict=False):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            shape, dtype = shapes[key]
            nbytes = shape.numel() * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key in keys:
                shape, dtype = shapes[key]
                t = source.get(key).to(dtype).contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().tobytes())
        tmp.replace(folder / name)
        total += offset
    if n > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return [folder / name for name in names]


def state_shapes(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``key -> (shape, dtype)`` of a model's state dict as ``save_pretrained`` writes it
    (tied copies left out, as transformers does)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items() if k not in tied}

