"""What a step reads from its samples: input identities and training digests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..storage.checkpoints import CheckpointLoader
from ..storage.identity import code_identity, combine, value_digest
from ..storage.keys import keys_digest
from ._sample import DelayedSample

DATA_VERSION_ATTRIBUTE = "data_version"

__all__ = [
    "DATA_VERSION_ATTRIBUTE",
    "attribute_identity",
    "input_identity",
    "training_digest",
]


def _loader_of(sample: Any, attribute: str) -> Callable[[], Any] | None:
    if attribute == "data" and isinstance(sample, DelayedSample):
        if "data" not in vars(sample):
            return sample._load
    delayed = getattr(sample, "_delayed_attributes", None) or {}
    return delayed.get(attribute)


def attribute_identity(sample: Any, attribute: str) -> str:
    """Digest of one attribute of a sample, without loading lazy values.

    * loaded from a samplepipe checkpoint: that checkpoint's identity;
    * loaded by another loader: the loader's code and arguments (e.g. the path
      of a ``functools.partial``) plus the sample's ``data_version`` attribute,
      if any: set it to change the identity when the file behind a loader
      changes;
    * in memory: a digest of its content.
    """
    state = sample.__dict__
    if attribute == "data" and "data" not in state:
        loader = state.get("_load")
        if type(loader) is CheckpointLoader:  # the common case, kept fast
            cached = loader.__dict__.get("_lineage")
            return "c" + (cached if cached is not None else loader.lineage())
    loader = _loader_of(sample, attribute)
    if isinstance(loader, CheckpointLoader):
        return "c" + loader.lineage()
    if loader is not None:
        version = vars(sample).get(DATA_VERSION_ATTRIBUTE)
        return "l" + combine(code_identity(loader), value_digest(version))
    try:
        value = getattr(sample, attribute)
    except AttributeError:
        return "-"
    if value is None:
        return "none"
    return "v" + value_digest(value)


def input_identity(sample: Any, attributes: Sequence[str]) -> str:
    """Digest of the attributes a step reads from one sample."""
    if len(attributes) == 1:
        return attribute_identity(sample, attributes[0])
    return combine(*(attribute_identity(sample, a) for a in attributes))


def _is_failed(sample: Any, attribute: str) -> bool:
    """An eager sample whose input is None (failed upstream): passed through."""
    if _loader_of(sample, attribute) is not None:
        return False
    return vars(sample).get(attribute, 0) is None


def training_digest(samples: Sequence[Any], attributes: Sequence[str]) -> str:
    """Digest of training samples: keys, input identities and fit metadata."""
    parts = []
    for s in samples:
        key = getattr(s, "key", None)
        parts.append(f"{key!r}={input_identity(s, attributes)}")
    return keys_digest(parts)


def _array_digest(X: Any, y: Any) -> str | None:
    """Digest of plain training arrays, None for lazy (Dask) collections."""
    if hasattr(X, "__dask_graph__") or hasattr(y, "__dask_graph__"):
        return None
    try:
        parts = [value_digest(np.asarray(X))]
        if y is not None:
            parts.append(value_digest(np.asarray(y)))
    except (TypeError, ValueError):
        return None
    return "arrays:" + combine(*parts)
