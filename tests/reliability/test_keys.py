"""Hostile keys: rejected before anything is written, or stored inside features_dir."""

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samplepipe import CheckpointWrapper, Sample, SampleWrapper
from samplepipe.testing import CountingTransformer

from . import _stats

PATHLIKE = st.lists(
    st.sampled_from(
        [
            "a",
            "b",
            "..",
            ".",
            "",
            "/",
            "\\",
            "C:",
            "\x00",
            "é",
            "x" * 120,
            ".h",
            "~",
            " ",
            "\n",
            "a..b",
            "%2e",
        ]
    ),
    min_size=1,
    max_size=6,
).map("".join)
KEYS = st.one_of(st.text(max_size=60), PATHLIKE)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(keys=st.lists(KEYS, min_size=1, max_size=3))
def test_keys_are_rejected_or_stored_inside(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("keys")
    features = root / "f"
    w = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True)), features_dir=str(features)
    )
    samples = [Sample(np.full(2, float(i)), key=k) for i, k in enumerate(keys)]
    try:
        out = w.transform(samples)
    except ValueError:
        # rejected: nothing at all was written
        assert os.listdir(root) == []
        _stats.add(hostile_keys_rejected=len(keys))
        return
    real = os.path.realpath(features)
    paths = [os.path.realpath(w.checkpoint_path(k)) for k in keys]
    assert len(set(paths)) == len(keys)  # distinct keys, distinct files
    for i, (k, p, o) in enumerate(zip(keys, paths, out)):
        assert p.startswith(real + os.sep)
        assert o.key == k
        np.testing.assert_array_equal(o.data, np.full(2, float(i)))
    files = [os.path.join(d, f) for d, _, fs in os.walk(features) for f in fs]
    assert len(files) == len(keys)
    _stats.add(hostile_keys_accepted=len(keys))
