"""The local Prefect server of `samplepipe run`: clear errors, never an orphan."""

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import free_port

pytestmark = pytest.mark.slow  # starts `samplepipe run` and its server

FACTORIES = """
import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from samplepipe import Sample, factory
from samplepipe.testing import CountingTransformer

@factory
def pipeline():
    return Pipeline([("scale", StandardScaler()),
                     ("slow", CountingTransformer(delay=DELAY, stateless=True))])

@factory
def samples(n=40):
    rng = np.random.default_rng(0)
    return [Sample(x, key=f"k{i}") for i, x in enumerate(rng.normal(size=(n, 3)))]
"""


def run_command(tmp_path, *args, env=None, **kwargs):
    environment = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    environment.pop("PREFECT_API_URL", None)  # the test harness's server
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "samplepipe", "run", *args],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def factories(tmp_path, delay):
    (tmp_path / "myjob.py").write_text(FACTORIES.replace("DELAY", repr(delay)))
    return [
        "myjob:pipeline",
        "--samples",
        "myjob:samples",
        "--train-samples",
        "myjob:samples",
        "--features-dir",
        "f",
        "--model-dir",
        "m",
        "--batch-size",
        "10",
        # samples() takes no "subset" (the demo's default kwargs)
        "--samples-kwargs",
        "{}",
        "--train-samples-kwargs",
        "{}",
    ]


def children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def running(proc, done):
    """Poll until ``done()`` returns something true; None if ``proc`` ends first."""
    while proc.poll() is None:
        found = done()
        if found:
            return found
        time.sleep(0.2)
    return None


def test_a_killed_run_leaves_no_server(tmp_path):
    proc = run_command(tmp_path, *factories(tmp_path, delay=0.2))

    def server():
        return [
            c
            for c in children(proc.pid)
            if b"uvicorn" in open(f"/proc/{c}/cmdline", "rb").read()
        ]

    servers = running(proc, server)
    assert servers, "the run did not start its server: " + proc.communicate()[1]
    # the flow really runs (its first checkpoints exist); its slow step sleeps
    # 2 s per batch of 10 samples: the kill comes mid-run
    assert running(proc, (tmp_path / "f").exists), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(servers[0]):
        time.sleep(0.2)
    assert not alive(servers[0]), "the server outlived its killed run"


def test_an_unreachable_api_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    proc = run_command(
        tmp_path, *factories(tmp_path, delay=0.0), env={"PREFECT_API_URL": url}
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"PREFECT_API_URL={url} does not answer" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_slow_server_start_is_a_clear_message_and_stops_it(tmp_path):
    proc = run_command(
        tmp_path,
        *factories(tmp_path, delay=0.0),
        env={"SAMPLEPIPE_SERVER_TIMEOUT": "0.01"},
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "did not answer within 0.01 s" in err
    assert "SAMPLEPIPE_SERVER_TIMEOUT" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("setting", ["PREFECT_SERVER_ANALYTICS_ENABLED"])
def test_the_command_sends_no_usage_statistics(tmp_path, setting):
    script = (
        "import os, samplepipe.cli as c\n"
        "c.app = lambda argv, result_action=None: "
        f"print(os.environ[{setting!r}]) or 0\n"
        "c.main([])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != setting}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "false"
