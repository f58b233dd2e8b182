"""The saved config's format version, and how a run folder's config saved before versions reads.

A run folder's ``config.yaml`` (and each checkpoint's copy) records every field as the run
used it; a later release must read it as written, so that resume, replay and export rebuild
the chain it trained. Fields whose default changed since are pinned to the old meaning here.
``RunConfig.to_yaml`` writes ``config_version``; a user's own config needs none, and is read
with today's defaults whatever fields it names.
"""

from __future__ import annotations

from typing import Any

CONFIG_VERSION = 1
"""1: the first versioned format (``raclora.chain_dtype`` exists, default ``auto``)."""


def read_version(data: dict[str, Any], source: str) -> int | None:
    """The ``config_version`` a config mapping names (None: unversioned).

    Raises:
        ValueError: not an integer in 1..:data:`CONFIG_VERSION` (a newer release wrote it).
    """
    version = data.get("config_version")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise ValueError(f"{source}: config_version {version!r}: this release reads versions 1 to {CONFIG_VERSION} "
                         "(a newer raclora_dist wrote it; upgrade to read it)")
    return version


def as_saved_before_versions(data: dict[str, Any]) -> dict[str, Any]:
    """A run folder's config written before ``config_version`` existed, with the ``raclora``
    fields that did not exist then set to what the run used. Such a config spells out every
    field its release had, so the fields it lacks tell its era. Returns a new mapping.
    """
    rc = data.get("raclora")
    if not isinstance(rc, dict):
        return data
    rc = dict(rc)
    # Before chain_budget: a factored chain was exact unless max_chain_rank capped it.
    if "chain_budget" not in rc and rc.get("max_chain_rank") is None:
        rc["chain_budget"] = None
    # Before chain_links: the budget alone capped the chain.
    if "chain_links" not in rc:
        rc["chain_links"] = None
    # Before chain_dtype: the chain was held in fp32.
    if "chain_dtype" not in rc:
        rc["chain_dtype"] = "float32"
    return {**data, "raclora": rc}
