"""The flows and the command line on an object store (a real S3 API server).

The same promises as on local folders (tests/test_flows.py): a second run
computes nothing, a deleted checkpoint is recomputed alone, a deleted model is
refitted, and ``status``/``clean`` judge the objects.
"""

import json
import os
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


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(root, storage_options)``: a local folder or a folder on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("store")


def s3(options):
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    return fs


def filesystem_of(options):
    return fsspec.filesystem("file") if options is None else s3(options)


def run(tmp_path, root, options, layout="files", flow=run_pipeline):
    return flow(
        counting_pipeline(str(tmp_path)),
        random_samples(N, prefix="train"),
        random_samples(N, prefix="test"),
        features_dir=f"{root}/features",
        model_dir=f"{root}/models",
        storage_options=options,
        batch_size=BATCH,
        layout=layout,
    )


def rows_of(summary):
    """Per ``(step, task)``: the sums of the summary rows' counts."""
    out = {}
    for r in summary:
        row = out.setdefault((r["step"], r["task"]), dict.fromkeys(r, 0))
        for name in ("samples", "computed", "loaded", "cached batches"):
            row[name] += r[name]
    return out


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_a_flow_computes_once_then_only_what_was_deleted(tmp_path, where, layout):
    root, options = where
    first = rows_of(run(tmp_path, root, options, layout))
    assert first["count", "transform"]["computed"] == 2 * N  # train and test
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N
    fs = filesystem_of(options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/features/count"))
    if layout == "files":
        assert len(names) == 2 * N and all(n.endswith(".h5") for n in names)
    else:  # one shard per batch (train and test) of this step
        assert len(names) == 2 * N // BATCH
        assert all(n.startswith("shard-") and n.endswith(".h5") for n in names)
    assert fs.exists(f"{root}/models/scale.pkl")

    second = rows_of(run(tmp_path, root, options, layout))
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N  # nothing new
    assert sum(r["computed"] for r in second.values()) == 0
    assert second["count", "transform"]["cached batches"] == 2 * N // BATCH

    # one checkpoint file deleted behind the cache's back: exactly its samples
    if layout == "files":
        fs.rm(f"{root}/features/count/test/00007.h5")
        lost = 1
    else:
        fs.rm(f"{root}/features/count/{names[3]}")
        lost = BATCH
    third = rows_of(run(tmp_path, root, options, layout))
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N + lost
    assert sum(r["computed"] for r in third.values()) == lost
    assert third["count", "transform"]["cached batches"] == 2 * N // BATCH - 1
    fs = filesystem_of(options)
    after = [p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/features/count")]
    assert len(after) == len(names)  # the lost one written again, nothing else


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


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_outputs_equal_scikit_learns_and_load_lazily(tmp_path, where, layout):
    root, options = where
    kwargs = {
        "features_dir": f"{root}/features",
        "model_dir": f"{root}/models",
        "batch_size": BATCH,
        "storage_options": options,
        "layout": layout,
    }
    train, test = random_samples(N, prefix="train"), random_samples(N, prefix="test")
    fitted = fit_pipeline(counting_pipeline(str(tmp_path)), train, **kwargs)
    assert all(step.layout == layout for _, step in fitted.steps)
    plain = counting_pipeline(str(tmp_path)).fit(np.stack([s.data for s in train]))
    expected = plain.transform(np.stack([s.data for s in test]))
    calls = []
    for attempt in ("computed", "cached"):
        out = transform_pipeline(fitted, test, **kwargs)
        assert [o.key for o in out] == [s.key for s in test], attempt
        assert [o.target for o in out] == [s.target for s in test]  # metadata kept
        np.testing.assert_allclose(np.stack([o.data for o in out]), expected)
        calls.append(count_rows(tmp_path / "count.log", "transform"))
    assert calls[0] >= N and calls[1] == calls[0]  # the second computed nothing


def put_users_file(fs, tmp_path, folder):
    """An HDF5 file samplepipe did not write, at ``folder/mine.h5``; its path."""
    mine = f"{folder}/mine.h5"
    with h5py.File(tmp_path / "mine.h5", "w") as f:
        f["x"] = np.arange(3)
    fs.put_file(str(tmp_path / "mine.h5"), mine)
    return mine


def cli_args(tmp_path, root, options):
    """The options of ``samplepipe status``/``clean`` for the runs above."""
    return [
        "--pipeline",
        "samplepipe.testing:counting_pipeline",
        "--pipeline-kwargs",
        json.dumps({"log_dir": str(tmp_path)}),
        "--features-dir",
        f"{root}/features",
        "--model-dir",
        f"{root}/models",
        "--storage-options",
        json.dumps(options or {}),
    ]


def test_status_and_clean_judge_objects_on_s3(tmp_path, store, capsys):
    root, options = store
    run(tmp_path, root, options)
    fs = s3(options)
    other = f"{root}/features/count/test/00003.h5"  # another key's checkpoint
    fs.pipe_file(other, fs.cat_file(f"{root}/features/count/test/00004.h5"))
    broken = f"{root}/features/count/test/00005.h5"  # truncated
    fs.pipe_file(broken, fs.cat_file(broken)[:100])
    mine = put_users_file(fs, tmp_path, f"{root}/features/count")
    args = cli_args(tmp_path, root, options)
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


def test_status_and_clean_judge_shards(tmp_path, where, capsys):
    root, options = where
    run(tmp_path, root, options, layout="shards")
    fs = filesystem_of(options)
    folder = f"{root}/features/count"
    shards = sorted(fs.find(folder))
    put_users_file(fs, tmp_path, folder)
    args = cli_args(tmp_path, root, options)

    def count_cells(layout):
        capsys.readouterr()
        assert cli.main(["status", *args, "--layout", layout]) == 0
        table = capsys.readouterr().out
        row = next(line for line in table.splitlines() if "│ count" in line)
        return [c.strip() for c in row.split("│") if c.strip()][:7]

    # step, model, valid, stale, corrupt, foreign, unknown: files, here shards
    valid = str(len(shards))
    assert count_cells("shards") == ["count", "present", valid, "0", "0", "0", "1"]
    assert len(shards) == 2 * N // BATCH
    # judged as one file per sample, the shards are files samplepipe cannot name
    files_view = count_cells("files")
    assert files_view[2] == "0" and files_view[6] == str(len(shards) + 1)

    assert cli.main(["clean", "--yes", *args, "--layout", "shards"]) == 0
    fs = filesystem_of(options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(folder))
    assert names == sorted([*(p.rsplit("/", 1)[-1] for p in shards), "mine.h5"])


def test_a_step_that_has_its_own_layout_keeps_it(tmp_path):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from samplepipe import CheckpointWrapper, SampleWrapper

    step = CheckpointWrapper(
        SampleWrapper(StandardScaler()),
        features_dir=str(tmp_path / "f"),
        layout="shards",
    )
    fitted = fit_pipeline(
        Pipeline([("scale", step), ("plain", StandardScaler())]),
        random_samples(8),
        features_dir=str(tmp_path / "features"),
        model_dir=str(tmp_path / "models"),
        batch_size=4,
    )
    assert [s.layout for _, s in fitted.steps] == ["shards", "files"]
    out = transform_pipeline(
        fitted,
        random_samples(8),
        features_dir=str(tmp_path / "features"),
        model_dir=str(tmp_path / "models"),
        batch_size=4,
    )
    assert len(out) == 8
    assert all(n.startswith("shard-") for n in os.listdir(tmp_path / "f"))
    plain = [
        f for _, _, files in os.walk(tmp_path / "features" / "plain") for f in files
    ]
    assert len(plain) == 8 and all(f.endswith(".h5") for f in plain)


@pytest.mark.parametrize("kind", ["shards", "nested"])
def test_a_step_with_a_layout_instance_runs_and_is_cached(tmp_path, kind):
    from sklearn.pipeline import Pipeline

    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.storage import ShardsLayout
    from samplepipe.testing import CountingTransformer, NestedFilesLayout

    log = str(tmp_path / "log")
    layout = ShardsLayout() if kind == "shards" else NestedFilesLayout()
    step = CheckpointWrapper(
        SampleWrapper(CountingTransformer(offset=1.0, log_path=log, stateless=True)),
        features_dir=str(tmp_path / "f"),
        layout=layout,
    )
    options = {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": 4,
    }
    samples = random_samples(8)
    first = transform_pipeline(Pipeline([("count", step)]), samples, **options)
    again = transform_pipeline(Pipeline([("count", step)]), samples, **options)
    assert count_rows(log, "transform") == 8  # the second run computed nothing
    expected = np.stack([s.data for s in samples]) + 1.0
    for out in (first, again):
        np.testing.assert_allclose(np.stack([s.data for s in out]), expected)
    names = [n for _, _, files in os.walk(tmp_path / "f") for n in files]
    if kind == "shards":
        assert names and all(n.startswith("shard-") for n in names)
    else:
        expected_files = {
            os.path.join(NestedFilesLayout.bucket(s.key), s.key + ".h5")
            for s in samples
        }
        found = {
            os.path.relpath(os.path.join(d, n), tmp_path / "f")
            for d, _, files in os.walk(tmp_path / "f")
            for n in files
        }
        assert found == expected_files


def test_a_step_whose_layout_the_flows_cannot_record_is_refused(tmp_path):
    from sklearn.pipeline import Pipeline

    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.storage import Layout
    from samplepipe.testing import CountingTransformer

    class Elsewhere(Layout):
        name = "elsewhere"

    step = CheckpointWrapper(
        SampleWrapper(CountingTransformer(stateless=True)),
        features_dir=str(tmp_path / "f"),
        layout=Elsewhere(),
    )
    with pytest.raises(ValueError, match="step 'count': .*built on FilesLayout"):
        transform_pipeline(
            Pipeline([("count", step)]),
            random_samples(4),
            features_dir=str(tmp_path / "features"),
            model_dir=str(tmp_path / "models"),
        )
    assert not (tmp_path / "f").exists() and not (tmp_path / "features").exists()


def test_an_unknown_layout_is_a_clear_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"layout='shard' is not one of"):
        fit_pipeline(
            counting_pipeline(str(tmp_path)),
            random_samples(4),
            features_dir=str(tmp_path / "features"),
            model_dir=str(tmp_path / "models"),
            layout="shard",
        )
    assert not (tmp_path / "features").exists()


def manifest_step(result):
    """The step a stored task result (a fit's or a batch's manifest) names."""
    from samplepipe.tasks import BatchManifest

    if result.startswith("samplepipe-manifest-"):
        return BatchManifest.from_bytes(result.encode()).step
    return json.loads(result)["step"]


def test_the_task_results_can_live_on_the_same_store(tmp_path, store):
    # Prefect's own fsspec block: the manifests (task results) beside the
    # checkpoints, read back by the cached re-run
    from prefect.filesystems import RemoteFileSystem

    root, options = store
    results = RemoteFileSystem(basepath=f"{root}/prefect-results", settings=options)
    results.save(f"results-{uuid.uuid4().hex[:12]}")  # Prefect wants a saved block
    flow = run_pipeline.with_options(result_storage=results)

    def go():
        return rows_of(run(tmp_path, root, options, flow=flow))

    first = go()
    assert first["count", "transform"]["computed"] == 2 * N
    records = []
    for path in s3(options).find(f"{root}/prefect-results"):
        blob = s3(options).cat_file(path)
        if blob.startswith(b'{"metadata"'):  # Prefect's result records
            records.append(json.loads(blob))
    assert {r["metadata"]["serializer"]["type"] for r in records} == {
        "samplepipe-manifest"
    }
    steps = sorted(manifest_step(r["result"]) for r in records)
    # a manifest per task run: the 2 fits, and the batches of both steps
    # (train and test through scale, test through count)
    assert steps.count("scale") == 1 + 2 * N // BATCH, steps
    assert steps.count("count") >= 1 + N // BATCH, steps
    second = go()
    assert sum(r["computed"] for r in second.values()) == 0
    assert second["count", "transform"]["cached batches"] == 2 * N // BATCH
    assert count_rows(tmp_path / "count.log", "transform") == 2 * N
