"""samplepipe: scikit-learn pipelines over samples, with checkpoints, Dask and Prefect.

The flows and tasks live in `samplepipe.flows` and `samplepipe.tasks` (they
import Prefect); importing `samplepipe` itself does not.
"""

from .wrappers import (
    CheckpointLoader,
    CheckpointWarning,
    CheckpointWrapper,
    DaskWrapper,
    DelayedSample,
    DelayedSampleSet,
    DelayedSampleSetCached,
    Sample,
    SampleBatch,
    SampleSet,
    SampleWrapper,
    ToDaskBag,
    check_key,
    dask_tags,
    estimator_options,
    estimator_requires_fit,
    hash_string,
    load_hdf5,
    save_hdf5,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointLoader",
    "CheckpointWarning",
    "CheckpointWrapper",
    "DaskWrapper",
    "DelayedSample",
    "DelayedSampleSet",
    "DelayedSampleSetCached",
    "Sample",
    "SampleBatch",
    "SampleSet",
    "SampleWrapper",
    "ToDaskBag",
    "check_key",
    "dask_tags",
    "estimator_options",
    "estimator_requires_fit",
    "hash_string",
    "load_hdf5",
    "save_hdf5",
    "wrap",
]
