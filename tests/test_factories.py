"""Only functions marked with @samplepipe.factory are called by import path."""

import re
import sys

import pytest

import samplepipe
import samplepipe.examples
from samplepipe.flows import load_object


def test_an_unmarked_function_is_never_called(tmp_path, monkeypatch):
    flag = tmp_path / "ran"
    (tmp_path / "victim.py").write_text(
        "def touch(path):\n    open(path, 'w').close()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ValueError, match=re.escape("decorate it with @samplepipe.factory")
    ):
        load_object("victim:touch", {"path": str(flag)}, "pipeline")
    assert not flag.exists()
    with pytest.raises(ValueError, match="not marked as a samplepipe factory"):
        load_object("subprocess:getoutput", {"cmd": f"touch {flag}"}, "pipeline")
    assert not flag.exists()
    sys.modules.pop("victim", None)


def test_a_marked_factory_is_called_with_its_kwargs(tmp_path, monkeypatch):
    (tmp_path / "jobs.py").write_text(
        "import samplepipe\n"
        "@samplepipe.factory\n"
        "def make(n=2):\n"
        "    return [samplepipe.Sample(i, key=str(i)) for i in range(n)]\n"
        "PLAIN = [samplepipe.Sample(0, key='a')]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [s.key for s in load_object("jobs:make", {"n": 3}, "samples")] == [
        "0",
        "1",
        "2",
    ]
    assert load_object("jobs:PLAIN", None, "samples")[0].key == "a"  # not called
    with pytest.raises(TypeError, match="samples_kwargs was given"):
        load_object("jobs:PLAIN", {"n": 1}, "samples")
    assert samplepipe.is_factory(samplepipe.examples.demo_pipeline)
    sys.modules.pop("jobs", None)
