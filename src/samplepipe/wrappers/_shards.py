"""Kept for imports of earlier versions: the sharded layout is now
`samplepipe.storage.layouts.ShardsLayout`, and `gc_paused` lives in
`samplepipe.storage.layouts`."""

from ..storage.layouts.base import gc_paused

__all__ = ["gc_paused"]
