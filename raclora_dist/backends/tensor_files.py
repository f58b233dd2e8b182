"""Loading ``.pt`` files from a checkpoint as data: tensors and plain containers, never code.

A checkpoint may come from shared storage (a PVC, S3) that someone else can write, and a
pickle can name any callable. Every ``torch.load`` of a checkpoint file goes through
:func:`load_tensors`: torch's ``weights_only`` unpickler, which admits tensors, numbers,
strings and containers, plus the few plain data classes DeepSpeed's optimizer state holds
(named in :data:`DEEPSPEED_DATA_CLASSES`, rebuilt by setting their fields; none runs code on
load). Anything else is refused with the file named (SECURITY.md).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from raclora_dist.config import ConfigError

#: ``module:qualname`` of the data classes inside DeepSpeed's ZeRO optimizer state (0.19):
#: its loss scaler (plain attributes), the enum of its stage, and a parameter fragment's
#: (start, numel) address.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def load_tensors(path: Path | str, map_location: Any = "cpu", allow: tuple[str, ...] = ()) -> Any:
    """``torch.load`` of a checkpoint file as data only.

    Args:
        path: the file.
        map_location: as ``torch.load``'s.
        allow: ``module:qualname`` of extra plain data classes the file may hold (imported
            here; a class that cannot be imported is simply not admitted).

    Returns:
        What the file holds (tensors, containers, numbers, strings, admitted classes).

    Raises:
        ConfigError: the file holds anything else (a pickled callable, an unknown class);
            the message names the file. Nothing in it has run.
    """
    classes: list = [c for c in (_import(name) for name in allow) if c is not None]
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        # torch's message is a paragraph suggesting the full unpickler; keep the line that
        # says what was found.
        found = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        found = found.split(" Please")[0].strip()[:200]
        raise ConfigError(f"checkpoint file {path}: refused: it holds more than tensors and plain data "
                          f"({found}); checkpoint files are loaded as data only, never as code "
                          "(SECURITY.md)") from None


def _import(name: str) -> type | None:
    import importlib

    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj
