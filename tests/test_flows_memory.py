"""Memory of a transform flow: bounded by the batch in work, not the batches in flight.

The data are lazily generated samples (`DelayedSample`), so the data in memory
are only what the flow and its steps load. tracemalloc counts every Python and
NumPy allocation of every thread.
"""

import tracemalloc

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from samplepipe import DelayedSample
from samplepipe.testing import CountingTransformer, count_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

N_FEATURES = 16_384  # 128 KiB per sample
BATCH = 100  # 12.5 MiB per batch


def lazy_samples(n, prefix):
    def loader(i):
        return lambda: np.random.default_rng(i).normal(size=N_FEATURES)

    return [DelayedSample(loader(i), key=f"{prefix}/{i:04d}") for i in range(n)]


def test_a_transform_flow_holds_about_two_batches_of_data(tmp_path):
    from samplepipe.flows import transform_pipeline

    log = tmp_path / "calls.log"
    pipeline = Pipeline(
        [("add", CountingTransformer(offset=1.0, stateless=True, log_path=str(log)))]
    )
    options = {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": BATCH,
        "max_batches_in_flight": 2,
    }
    transform_pipeline(pipeline, lazy_samples(4, "warm"), **options)
    samples = lazy_samples(6 * BATCH, "s")
    batch_bytes = BATCH * N_FEATURES * 8
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = transform_pipeline(pipeline, samples, **options)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert count_rows(log, "transform") == 4 + 6 * BATCH
    # a batch in work holds its stacked input and its output (two batches);
    # with two batches in flight both holding theirs: 4.0 (measured)
    assert peak < 3 * batch_bytes, f"{peak / batch_bytes:.2f} batches"
    np.testing.assert_array_equal(out[250].data, samples[250].data + 1.0)
