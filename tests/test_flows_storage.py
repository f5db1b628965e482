"""The flows and the command line on an object store (a real S3 API server).

The same promises as on local folders (tests/test_flows.py): a second run
computes nothing, a deleted checkpoint is recomputed alone, a deleted model is
refitted, and ``status``/``clean`` judge the objects.
"""

import json
import uuid

import fsspec
import h5py
import numpy as np
import pytest

from samplepipe import cli
from samplepipe.flows import fit_pipeline, run_pipeline, transform_pipeline
from samplepipe.testing import count_rows, counting_pipeline, random_samples

from .test_storage_fs import BUCKET, s3_server  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.slow,  # Prefect flow runs
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]

N = 40
BATCH = 10


@pytest.fixture
def store(s3_server):  # noqa: F811 - the fixture imported above
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    options = {"endpoint_url": s3_server.endpoint}
    return root, options


def s3(options):
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    return fs


def run(tmp_path, root, options):
    return run_pipeline(
        counting_pipeline(str(tmp_path)),
        random_samples(N, prefix="train"),
        random_samples(N, prefix="test"),
        features_dir=f"{root}/features",
        model_dir=f"{root}/models",
        storage_options=options,
        batch_size=BATCH,
    )


def rows_of(summary):
    """Per ``(step, task)``: the sums of the summary rows' counts."""
    out = {}
    for r in summary:
        row = out.setdefault((r["step"], r["task"]), dict.fromkeys(r, 0))
        for name in ("samples", "computed", "loaded", "cached batches"):
            row[name] += r[name]
    return out


def test_a_flow_on_s3_computes_once_then_only_what_was_deleted(tmp_path, store):
    root, options = store
    first = rows_of(run(tmp_path, root, options))
    assert first["count", "transform"]["computed"] == 2 * N  # train and test
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N
    fs = s3(options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/features/count"))
    assert len(names) == 2 * N and all(n.endswith(".h5") for n in names)
    assert fs.exists(f"{root}/models/scale.pkl")

    second = rows_of(run(tmp_path, root, options))
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N  # nothing new
    assert sum(r["computed"] for r in second.values()) == 0
    assert second["count", "transform"]["cached batches"] == 2 * N // BATCH

    # one checkpoint object deleted behind the cache's back: exactly it again
    fs.rm(f"{root}/features/count/test/00007.h5")
    third = rows_of(run(tmp_path, root, options))
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N + 1
    assert sum(r["computed"] for r in third.values()) == 1
    assert s3(options).exists(f"{root}/features/count/test/00007.h5")


def test_a_deleted_model_object_is_refitted_not_served_from_the_cache(tmp_path, store):
    root, options = store
    run(tmp_path, root, options)
    fs = s3(options)
    fs.rm(f"{root}/models/scale.pkl")
    rows = rows_of(run(tmp_path, root, options))
    assert rows["scale", "fit"]["computed"] == N  # refitted, not a cached manifest
    assert s3(options).exists(f"{root}/models/scale.pkl")
    # the same fit gives the same model: no checkpoint was recomputed
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N


def test_outputs_on_s3_equal_scikit_learns_and_load_lazily(tmp_path, store):
    root, options = store
    kwargs = {
        "features_dir": f"{root}/features",
        "model_dir": f"{root}/models",
        "batch_size": BATCH,
        "storage_options": options,
    }
    train, test = random_samples(N, prefix="train"), random_samples(N, prefix="test")
    fitted = fit_pipeline(counting_pipeline(str(tmp_path)), train, **kwargs)
    out = transform_pipeline(fitted, test, **kwargs)
    assert [o.key for o in out] == [s.key for s in test]
    assert [o.target for o in out] == [s.target for s in test]  # metadata kept
    plain = counting_pipeline(str(tmp_path)).fit(np.stack([s.data for s in train]))
    expected = plain.transform(np.stack([s.data for s in test]))
    np.testing.assert_allclose(np.stack([o.data for o in out]), expected)


def test_status_and_clean_judge_objects_on_s3(tmp_path, store, capsys):
    root, options = store
    run(tmp_path, root, options)
    fs = s3(options)
    other = f"{root}/features/count/test/00003.h5"  # another key's checkpoint
    fs.pipe_file(other, fs.cat_file(f"{root}/features/count/test/00004.h5"))
    broken = f"{root}/features/count/test/00005.h5"  # truncated
    fs.pipe_file(broken, fs.cat_file(broken)[:100])
    mine = f"{root}/features/count/mine.h5"  # an HDF5 file samplepipe did not write
    with h5py.File(tmp_path / "mine.h5", "w") as f:
        f["x"] = np.arange(3)
    fs.put_file(str(tmp_path / "mine.h5"), mine)
    args = [
        "--pipeline",
        "samplepipe.testing:counting_pipeline",
        "--pipeline-kwargs",
        json.dumps({"log_dir": str(tmp_path)}),
        "--features-dir",
        f"{root}/features",
        "--model-dir",
        f"{root}/models",
        "--storage-options",
        json.dumps(options),
    ]
    capsys.readouterr()
    assert cli.main(["status", *args]) == 0
    table = capsys.readouterr().out
    count_row = next(line for line in table.splitlines() if "│ count" in line)
    cells = [c.strip() for c in count_row.split("│") if c.strip()]
    # step, model, valid, stale, corrupt, foreign, unknown, ...
    assert cells[:7] == ["count", "present", str(2 * N - 2), "0", "1", "1", "1"], table

    assert cli.main(["clean", "--yes", *args]) == 0
    fs = s3(options)
    assert not fs.exists(other) and not fs.exists(broken)
    assert fs.exists(mine)  # unknown: kept
    assert fs.exists(f"{root}/features/count/test/00004.h5")


def test_a_sharded_step_is_a_clear_error_before_any_work(tmp_path):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from samplepipe import CheckpointWrapper, SampleWrapper

    step = CheckpointWrapper(
        SampleWrapper(StandardScaler()),
        features_dir=str(tmp_path / "f"),
        layout="shards",
    )
    with pytest.raises(ValueError, match="step 'scale' has layout='shards'"):
        fit_pipeline(
            Pipeline([("scale", step)]),
            random_samples(4),
            features_dir=str(tmp_path / "features"),
            model_dir=str(tmp_path / "models"),
        )
    assert not any(tmp_path.iterdir())
