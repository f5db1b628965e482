"""samplepipe: scikit-learn pipelines over samples, with checkpoints, Dask and Prefect.

The flows and tasks live in `samplepipe.flows` and `samplepipe.tasks` (they
import Prefect); importing `samplepipe` itself does not.
"""

from . import wrappers
from ._factory import factory as factory
from ._factory import is_factory as is_factory
from .wrappers import *  # noqa: F403  (the public API, listed in wrappers.__all__)

__version__ = "0.6.0.dev0"

__all__ = sorted([*wrappers.__all__, "factory", "is_factory"])
