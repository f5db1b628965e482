"""Checkpoint layouts, registered by name: `Layout` and `register_layout`.

A layout decides where a step's checkpoints live and how a batch of them is
judged, written, listed, removed and compacted, on the pattern of joblib's
``StoreBackendBase`` + ``register_store_backend``;
``CheckpointWrapper(layout=...)`` takes a registered name or an instance and
delegates to it. Built in:

``"files"`` (`FilesLayout`, the default)
    one file per sample, ``<features_dir>/[<hash_fn(key)>/]<key><extension>``.
``"shards"`` (`ShardsLayout`)
    one HDF5 file per batch of samples (see `samplepipe.storage.shards`).

A layout of one's own subclasses `Layout` (or, to place one file per sample
elsewhere, `FilesLayout` and its `FilesLayout.names`/`FilesLayout.key_of`).

Examples
--------
>>> from samplepipe.storage import FilesLayout, register_layout, registered_layouts
>>> class ByFirstLetter(FilesLayout):
...     '''One sub-folder per first letter of the key: ``s/s1.h5``.'''
...     def names(self, context, keys):
...         keys = list(keys)
...         return [f"{k[0]}/{n}" for k, n in zip(keys, super().names(context, keys))]
...     def key_of(self, context, rel):
...         letter, _, key = rel.partition("/")
...         return key if key[:1] == letter else None
>>> register_layout("by-first-letter", ByFirstLetter)
>>> "by-first-letter" in registered_layouts()
True
"""

from .base import (
    Layout,
    LayoutContext,
    format_funcs,
    gc_paused,
    get_layout,
    register_layout,
    registered_layouts,
)
from .files import FilesLayout
from .shards import ShardsLayout

__all__ = [
    "FilesLayout",
    "Layout",
    "LayoutContext",
    "ShardsLayout",
    "format_funcs",
    "gc_paused",
    "get_layout",
    "register_layout",
    "registered_layouts",
]

register_layout("files", FilesLayout)
register_layout("shards", ShardsLayout)
