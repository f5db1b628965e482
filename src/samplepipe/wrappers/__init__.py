"""The scikit-learn layer: samples and the wrappers around estimators."""

from ._base import estimator_options, estimator_requires_fit
from ._checkpoint import (
    CheckpointLoader,
    CheckpointWarning,
    CheckpointWrapper,
    check_key,
    hash_string,
    load_hdf5,
    save_hdf5,
)
from ._dask import DaskWrapper, ToDaskBag, dask_tags
from ._explain import REASONS, Explanation, VerifyReport
from ._inputs import attribute_identity
from ._method import PREDICTION_METHODS, UseMethod, available_methods
from ._sample import (
    DelayedSample,
    DelayedSampleSet,
    DelayedSampleSetCached,
    Sample,
    SampleBatch,
    SampleSet,
    failed_output,
    lazy_output,
)
from ._sample_wrapper import SampleWrapper
from ._utils import (
    flatten_samplesets,
    getattr_nested,
    is_instance_nested,
    is_pipeline_wrapped,
)
from ._wrap import wrap

__all__ = [
    "CheckpointLoader",
    "CheckpointWarning",
    "CheckpointWrapper",
    "DaskWrapper",
    "DelayedSample",
    "DelayedSampleSet",
    "DelayedSampleSetCached",
    "Explanation",
    "PREDICTION_METHODS",
    "REASONS",
    "Sample",
    "SampleBatch",
    "SampleSet",
    "SampleWrapper",
    "ToDaskBag",
    "UseMethod",
    "VerifyReport",
    "attribute_identity",
    "available_methods",
    "check_key",
    "dask_tags",
    "estimator_options",
    "estimator_requires_fit",
    "failed_output",
    "flatten_samplesets",
    "getattr_nested",
    "hash_string",
    "is_instance_nested",
    "is_pipeline_wrapped",
    "lazy_output",
    "load_hdf5",
    "save_hdf5",
    "wrap",
]
