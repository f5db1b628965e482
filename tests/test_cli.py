"""The samplepipe command line, run as a user runs it (a real subprocess)."""

import os
import subprocess
import sys

import pytest

from samplepipe.storage.files import HOST_TAG

from .conftest import command_env, random_samples_options, samplepipe

pytestmark = pytest.mark.slow  # runs flows through the command line

SMALL = [
    "--train-samples-kwargs",
    '{"subset": "train", "n": 300}',
    "--samples-kwargs",
    '{"subset": "test", "n": 100}',
    "--batch-size",
    "100",
]


def cli(*args, cwd, env=None, check=True):
    result = samplepipe(*args, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run twice in a fresh PREFECT_HOME, each run with its own server."""
    cwd = tmp_path_factory.mktemp("demo")
    env = command_env(cwd)
    first = cli("run", *SMALL, cwd=cwd, env=env)
    features = cwd / "samplepipe-demo" / "features"
    files = {p: p.stat().st_mtime_ns for p in features.rglob("*.h5")}
    second = cli("run", *SMALL, cwd=cwd, env=env)
    return cwd, env, first, second, files


@pytest.mark.parametrize("command", ["run", "serve", "status", "clean"])
def test_help(tmp_path, command):
    out = cli(command, "--help", cwd=tmp_path).stdout
    assert "Usage: samplepipe " + command in out
    assert "--features-dir" in out


def test_first_run_computes_and_second_computes_nothing(demo):
    cwd, _, first, second, files = demo
    assert "scores" in first.stdout and "Computed" in first.stdout
    assert "Nothing computed" in second.stdout
    assert len(files) == 2 * 400 + 100  # scale and pca: train + test; scores: test
    assert {p: p.stat().st_mtime_ns for p in files} == files  # untouched
    assert sorted(os.listdir(cwd / "samplepipe-demo" / "models")) == [
        "pca.pkl",
        "scale.pkl",
        "scores.pkl",
    ]


def test_status_counts_a_corrupt_file_and_clean_removes_it(demo):
    cwd, env, *_ = demo
    features = cwd / "samplepipe-demo" / "features"
    victim = features / "pca" / "digits" / "00007.h5"
    victim.write_bytes(b"garbage")
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()  # a crashed writer: its process is gone
    tmp = f".00003.h5.{HOST_TAG}-{proc.pid}-abcdef12.tmp"
    leftover = features / "scale" / "digits" / tmp
    leftover.write_bytes(b"partial")
    status = cli("status", cwd=cwd, env=env).stdout
    pca_row = next(line for line in status.splitlines() if "│ pca" in line)
    cells = [c.strip() for c in pca_row.split("│") if c.strip()]
    assert cells[:4] == ["pca", "present", "399", "0"]  # valid, stale
    assert cells[4] == "1"  # corrupt
    dry = cli("clean", "--dry-run", cwd=cwd, env=env).stdout
    assert "2 file(s)" in dry and victim.exists()
    refused = cli("clean", cwd=cwd, env=env, check=False)
    assert refused.returncode == 1 and victim.exists()
    cli("clean", "--yes", cwd=cwd, env=env)
    assert not victim.exists() and not leftover.exists()
    status = cli("status", cwd=cwd, env=env).stdout
    pca_row = next(line for line in status.splitlines() if "│ pca" in line)
    assert [c.strip() for c in pca_row.split("│") if c.strip()][2:5] == [
        "399",
        "0",
        "0",
    ]


def test_own_factories_in_the_current_folder_with_shards(tmp_path, prefect_server):
    # the README's "Running on several machines" command, on local folders: the
    # user's factories take no keyword arguments (the demo's subset is not
    # passed to them), and --layout shards reaches the steps and status
    (tmp_path / "mymodule.py").write_text(
        "import samplepipe\n"
        "from samplepipe.testing import random_samples\n"
        "from sklearn.decomposition import PCA\n"
        "from sklearn.pipeline import Pipeline\n"
        "from sklearn.preprocessing import StandardScaler\n\n"
        "@samplepipe.factory\n"
        "def make_pipeline():\n"
        "    return Pipeline([('scale', StandardScaler()), ('pca', PCA(2))])\n\n"
        "@samplepipe.factory\n"
        "def train_samples():\n"
        "    return random_samples(30, prefix='train')\n\n"
        "@samplepipe.factory\n"
        "def test_samples():\n"
        "    return random_samples(20, prefix='test')\n"
    )
    env = command_env(tmp_path, prefect_server["PREFECT_API_URL"])
    where = ["--features-dir", "features", "--model-dir", "models"]
    cli(
        "run",
        "mymodule:make_pipeline",
        "--train-samples",
        "mymodule:train_samples",
        "--samples",
        "mymodule:test_samples",
        *where,
        "--layout",
        "shards",
        "--batch-size",
        "10",
        cwd=tmp_path,
        env=env,
    )
    for step in ("scale", "pca"):
        names = os.listdir(tmp_path / "features" / step)
        # scale: train (3 batches) and test (2); pca: test only
        assert len(names) == (5 if step == "scale" else 2), names
        assert all(n.startswith("shard-") for n in names)
    status = cli(
        "status", "mymodule:make_pipeline", *where, "--layout", "shards", cwd=tmp_path
    )
    rows = [line for line in status.stdout.splitlines() if "│ pca" in line]
    cells = [c.strip() for c in rows[0].split("│") if c.strip()]
    assert cells[:7] == ["pca", "present", "2", "0", "0", "0", "0"], status.stdout


def test_run_fails_with_the_step_named(tmp_path, prefect_server):
    # the session's server: what is tested here does not depend on the server
    env = command_env(tmp_path, prefect_server["PREFECT_API_URL"])
    (tmp_path / "fail").write_text("x")  # step "count" raises OSError while it exists
    result = cli(
        "run",
        "samplepipe.testing:counting_pipeline",
        "--pipeline-kwargs",
        '{"log_dir": ".", "fail_marker": "fail"}',
        *random_samples_options(20, 20, seed=1, prefix="t"),
        "--retries",
        "0",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "FAILED at step count" in " ".join(result.stderr.split())
    bad = cli("run", "no.such.module:pipe", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 1
    assert "cannot import module 'no.such.module'" in " ".join(bad.stderr.split())


def test_factories_may_return_sample_sources(tmp_path, prefect_server):
    # a factory returns a stream (read once, batch by batch) or an indexed
    # source (fit reads it whole); the command line never builds the outputs
    (tmp_path / "sources.py").write_text(
        "import samplepipe\n"
        "from samplepipe.testing import random_samples\n"
        "from sklearn.decomposition import PCA\n"
        "from sklearn.pipeline import Pipeline\n"
        "from sklearn.preprocessing import StandardScaler\n\n"
        "@samplepipe.factory\n"
        "def make_pipeline():\n"
        "    return Pipeline([('scale', StandardScaler()), ('pca', PCA(2))])\n\n"
        "class Pages:\n"
        "    def __len__(self):\n"
        "        return 30\n"
        "    def batch(self, start, stop):\n"
        "        return random_samples(stop - start, prefix='train', start=start)\n\n"
        "@samplepipe.factory\n"
        "def train_samples():\n"
        "    return Pages()\n\n"
        "@samplepipe.factory\n"
        "def test_samples():\n"
        "    for start in range(0, 25, 7):\n"
        "        yield random_samples(min(7, 25 - start), prefix='test', start=start)\n"
    )
    env = command_env(tmp_path, prefect_server["PREFECT_API_URL"])
    out = cli(
        "run",
        "sources:make_pipeline",
        "--train-samples",
        "sources:train_samples",
        "--samples",
        "sources:test_samples",
        "--features-dir",
        "features",
        "--model-dir",
        "models",
        "--batch-size",
        "10",
        cwd=tmp_path,
        env=env,
    ).stdout
    test_keys = {f"test/{i:05d}.h5" for i in range(25)}
    pca = tmp_path / "features" / "pca"
    assert {str(p.relative_to(pca)) for p in pca.rglob("*.h5")} == test_keys
    scale = tmp_path / "features" / "scale" / "train"
    assert len(list(scale.glob("*.h5"))) == 30
    assert "Computed" in out
    again = cli(
        "run",
        "sources:make_pipeline",
        "--train-samples",
        "sources:train_samples",
        "--samples",
        "sources:test_samples",
        "--features-dir",
        "features",
        "--model-dir",
        "models",
        "--batch-size",
        "10",
        cwd=tmp_path,
        env=env,
    ).stdout
    assert "Nothing computed" in again
