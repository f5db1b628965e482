"""Memory of a transform flow: bounded by the batch in work, not the batches in flight.

The data are lazily generated samples (`DelayedSample`), so the data in memory
are only what the flow and its steps load. tracemalloc counts every Python and
NumPy allocation of every thread.
"""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from samplepipe import DelayedSample
from samplepipe.testing import CountingTransformer, count_rows

N_FEATURES = 16_384  # 128 KiB per sample
BATCH = 100  # 12.5 MiB per batch


def lazy_samples(n, prefix):
    def loader(i):
        return lambda: np.random.default_rng(i).normal(size=N_FEATURES)

    return [DelayedSample(loader(i), key=f"{prefix}/{i:04d}") for i in range(n)]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
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


FREED_TWICE = """
import sys
import numpy as np
from samplepipe.tasks import one_batch_holds_data

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

if sys.argv[1] == "flow":
    import os, uuid
    # set after the start, as Dask's nanny does: glibc never reads it
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    with one_batch_holds_data(uuid.uuid4()):
        pass
for _ in range(2):  # glibc raises its threshold when the first one is freed
    before = rss_kib()
    a = np.ones(8 * 2**20 // 8)
    del a
print(rss_kib() - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)"
)
def test_a_flow_process_gives_freed_batch_arrays_back_at_once():
    # glibc's defaults (Dask's nanny leaves MALLOC_TRIM_THRESHOLD_ in the
    # environment of the process that started a LocalCluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def kept_kib(mode):
        out = subprocess.run(
            [sys.executable, "-c", FREED_TWICE, mode],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return int(out.stdout.strip().splitlines()[-1])

    # without a flow, the second 8 MiB array comes from the heap and its pages
    # stay resident once freed: what the check below must tell apart
    assert kept_kib("plain") > 6 * 1024
    assert kept_kib("flow") < 1024
