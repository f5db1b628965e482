"""What crosses a layer is typed: `Status`, `TransformReport`, `Record`."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest

from samplepipe.storage import (
    Identity,
    Record,
    ShardEntry,
    Stamp,
    Status,
    TransformReport,
    checkpoint_status,
    hdf5,
    load_hdf5,
    read_record,
    save_hdf5,
)
from samplepipe.tasks import BatchManifest

from .conftest import counting_checkpoint, make_samples

# -- Status ------------------------------------------------------------------


@pytest.mark.parametrize("status", list(Status))
def test_a_status_is_its_bare_string_everywhere_a_user_sees_it(status):
    value = status.value
    assert isinstance(status, str)
    assert status == value and value == status and hash(status) == hash(value)
    assert Status(value) is status
    assert {value: 1}[status] == 1 and status in {value}
    assert (
        str(status) == value
        and f"{status}" == value
        and f"{status:>10}" == (f"{value:>10}")
    )
    assert "%s" % status == value  # noqa: UP031 - the old formatting too
    assert json.dumps({status: [status]}) == json.dumps({value: [value]})
    # repr: the bare string's, so doctests and printed lists are unchanged
    assert repr(status) == repr(value) and repr([status]) == repr([value])


def test_statuses_are_the_documented_ones():
    assert [s.value for s in Status] == [
        "valid",
        "missing",
        "stale",
        "foreign",
        "corrupt",
        "unknown",
        "temporary",
        "writing",
        "ok",
        "changed",
    ]


def test_judged_and_listed_statuses_are_status_members(tmp_path):
    step, _ = counting_checkpoint(tmp_path)
    samples = make_samples(3)
    step.fit(samples).transform(samples)
    listed = list(step.iter_checkpoints())
    assert [type(s) for _, s, _ in listed] == [Status] * 3
    assert [s for _, s, _ in listed] == ["valid"] * 3
    path = listed[0][0]
    wanted = Identity("other-step", "", samples[0].key)
    status, _, _ = checkpoint_status(path, wanted)
    assert status is Status.STALE
    assert read_record(path)[0] is Status.OK
    assert read_record(str(tmp_path / "nothing.h5"))[0] is Status.MISSING


def test_statuses_given_as_strings_still_work(tmp_path):
    step, _ = counting_checkpoint(tmp_path)
    samples = make_samples(2)
    step.fit(samples).transform(samples)
    other, _ = counting_checkpoint(tmp_path, offset=2.0)
    assert other.remove_checkpoints(("stale",), dry_run=True)[0][1] == "stale"
    with pytest.raises(ValueError, match=re.escape("never removes ['valid']")):
        other.remove_checkpoints(("valid",))


# -- TransformReport ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_the_layouts_fill_a_transform_report(tmp_path, layout):
    step, _ = counting_checkpoint(tmp_path, layout=layout)
    samples = make_samples(4)
    step.fit(samples)
    first = TransformReport()
    step.transform_samples(samples, report=first)
    assert (first.computed, first.loaded, first.recomputed, first.failed) == (
        4,
        0,
        0,
        0,
    )
    assert first.step == step.step_identity() and len(first) == 4
    assert first.inputs == step.input_identities(samples)
    assert all(isinstance(st, Stamp) for st in first.stamps)
    assert all(os.path.isfile(p) for p in first.paths)
    again = TransformReport()
    step.transform_samples(samples, report=again)
    assert (again.computed, again.loaded) == (0, 4)
    if layout == "files":
        assert again.entries is None
        assert [Record.parse(r).key for r in again.records] == [s.key for s in samples]
    else:
        assert again.records is None
        assert all(type(e) is ShardEntry for e in again.entries)
        assert len(set(again.paths)) == 1  # one shard


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_a_dict_report_warns_and_still_receives_the_keys_of_0_5(tmp_path, layout):
    step, _ = counting_checkpoint(tmp_path, layout=layout)
    samples = make_samples(3)
    step.fit(samples)
    report: dict = {}
    with pytest.warns(DeprecationWarning, match=r"report=samplepipe\.storage\."):
        step.transform_samples(samples, report=report)
    assert (report["computed"], report["loaded"], report["failed"]) == (3, 0, 0)
    keys = {"computed", "loaded", "recomputed", "failed", "step", "inputs", "files"}
    assert keys <= set(report)
    path, stamp, *entry = report["files"][0]
    assert os.path.isfile(path) and isinstance(stamp, Stamp)
    assert ("records" in report) == (layout == "files")
    assert len(entry) == (layout == "shards")


def test_dict_access_on_a_report_warns_naming_the_attribute():
    report = TransformReport(computed=2, paths=["a"], stamps=[Stamp(1, 2, 3, 4)])
    with pytest.warns(DeprecationWarning, match=re.escape("use report.computed")):
        assert report["computed"] == 2
    with pytest.warns(DeprecationWarning, match=re.escape("use report.files")):
        assert report["files"] == [("a", Stamp(1, 2, 3, 4))]
    with pytest.warns(DeprecationWarning, match=re.escape("use report.loaded")):
        report["loaded"] = 5  # a layout written for 0.5
    assert report.loaded == 5
    with pytest.raises(KeyError):
        report["nothing"]


def test_a_failed_sample_is_none_in_the_files_and_counts_as_failed():
    report = TransformReport(computed=1, paths=["a"], stamps=[Stamp(1, 2, 3, 4)])
    report.extend(TransformReport.failed_sample())
    assert (report.computed, report.failed, len(report)) == (1, 1, 2)
    assert report.files == [("a", Stamp(1, 2, 3, 4)), None]


def test_a_manifest_from_a_dict_report_warns_and_is_the_same(tmp_path):
    step, _ = counting_checkpoint(tmp_path)
    samples = make_samples(3)
    step.fit(samples)
    report = TransformReport()
    step.transform_samples(samples, report=report)
    keys = [s.key for s in samples]
    options = {"step": "s", "start": 0, "root": str(tmp_path / "features")}
    options.update(layout="files", attribute="data", errors=[], seconds=0.0)
    typed = BatchManifest.from_report(report, keys, **options)
    with pytest.warns(DeprecationWarning, match="TransformReport"):
        legacy = BatchManifest.from_report(report.as_dict(), keys, **options)
    assert legacy.to_bytes() == typed.to_bytes()
    for a, b in zip(typed.samples(samples, step), step.transform(samples)):
        np.testing.assert_array_equal(a.data, b.data)


# -- Record --------------------------------------------------------------------


def test_a_checkpoints_record_is_read_through_record(tmp_path):
    step, _ = counting_checkpoint(tmp_path)
    samples = make_samples(2)
    step.fit(samples)
    report = TransformReport()
    out = step.transform_samples(samples, report=report)
    record = Record.parse(report.records[0])
    assert (record.key, record.step, record.format) == (
        samples[0].key,
        step.step_identity(),
        "3",
    )
    assert record.text() == report.records[0]
    np.testing.assert_array_equal(
        hdf5.load_verified(report.paths[0], report.records[0]), out[0].data
    )
    with pytest.raises(ValueError, match="not a samplepipe checkpoint record"):
        hdf5.load_verified(report.paths[0], "garbage")


def test_save_hdf5_writes_a_record_of_its_kind_alone(tmp_path):
    path = str(tmp_path / "x.h5")
    save_hdf5(np.arange(3), path)
    record, _ = hdf5.read(path)
    assert Record.parse(record) == Record("", "", "", "", "a", "")
    np.testing.assert_array_equal(load_hdf5(path), np.arange(3))
    save_hdf5("text", path)
    assert load_hdf5(path) == "text"


def test_no_warning_on_the_typed_paths(tmp_path):
    step, _ = counting_checkpoint(tmp_path)
    samples = make_samples(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step.fit(samples).transform_samples(samples, report=TransformReport())
