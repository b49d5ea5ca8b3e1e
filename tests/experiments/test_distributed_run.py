"""Two real processes on 127.0.0.1 (``jax.distributed``, CPU) split a run's units
and leave the same run folder as one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIG2 = os.path.join(ROOT, "configs", "jacot_fig2.yaml")
SMALL = ["model.width=[8, 16]", "train.steps=6", "train.inits=2", "params.n_gamma=9"]
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out, extra=()):
    args = ["run", FIG2, "--preset", "tiny", "--out", out, "--quiet"]
    for o in (*SMALL, *extra):
        args += ["--set", o]
    return [sys.executable, "-c", "import sys; from ntkexp.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _run_all(cmds):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(), cwd=ROOT) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-3000:]
    return outs


def _load(d):
    with np.load(os.path.join(d, "results.npz")) as z:
        res = {k: z[k] for k in z.files}
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    return res, summary, meta


@pytest.mark.slow
def test_two_processes_split_the_units_and_match_one_process(tmp_path):
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    port = _free_port()
    dist = ["distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2"]
    _run_all([_cmd(multi, (*dist, f"distributed.process_id={i}")) for i in (0, 1)])
    _run_all([_cmd(single)])
    r1, s1, m1 = _load(single)
    r2, s2, m2 = _load(multi)
    assert s2 == s1
    assert r2.keys() == r1.keys()
    for k in r1:
        if r1[k].dtype.kind in "fc":
            np.testing.assert_allclose(r2[k], r1[k], rtol=1e-6, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(r2[k], r1[k], err_msg=k)
    assert m1["processes"] == 1 and m2["processes"] == 2
    per = m2["units_by_process"]
    assert sorted(per) == ["0", "1"] and [len(per[p]) for p in ("0", "1")] == [1, 1]
    assert m2["units_computed"] == 4
    # only process 0 wrote: one folder, every unit file in it
    assert len(os.listdir(os.path.join(multi, "units"))) == 4


_TWIN = """
import sys, numpy as np, jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from ntkexp.experiments import distributed as D
c = D.current()
assert (c.index, c.count) == (int(sys.argv[2]), 2)
todo = D.broadcast(c, "t/todo", [[0, 1], [2, 3]] if c.is_main else None)
assert todo == [[0, 1], [2, 3]]
big = np.arange(300_000, dtype=np.float64) * (c.index + 1)   # > one 1 MiB piece
if c.is_main:
    got = D.receive(c, "t")
    np.testing.assert_array_equal(got[1]["u1.npz"]["x"], 2 * np.arange(300_000.0))
    assert got[1]["u1.npz"]["k"].tolist() == [1, 2]
    D.finish(c, "t")
else:
    D.send(c, "t", {"u1.npz": {"x": big, "k": np.array([1, 2])}})
    D.wait_for_main(c, "t")
print("ok", c.index)
"""


def test_two_processes_exchange_through_collectives():
    """Fast twin of the run-folder test: the broadcast / send / receive / finish
    protocol between two real processes (process_allgather; values over 1 MiB)."""
    addr = f"127.0.0.1:{_free_port()}"
    outs = _run_all([[sys.executable, "-c", _TWIN, addr, str(i)] for i in (0, 1)])
    assert "ok 0" in outs[0] and "ok 1" in outs[1]


@pytest.mark.parametrize("n", [2, 3])
def test_assignment_balances_work(n):
    from ntkexp.experiments.distributed import assign

    work = [16 * 2, 8 * 2, 4 * 2, 4 * 2]
    owner = assign(work, n)
    load = [sum(w for w, o in zip(work, owner, strict=True) if o == p) for p in range(n)]
    assert max(load) <= max(work) + min(work)
    assert sorted(set(owner)) == list(range(n))


_KILLED = """
import os, signal, sys, time, jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from ntkexp.experiments import distributed as D
c = D.current()
D.broadcast(c, "t/todo", [1] if c.is_main else None)
if c.is_main:
    try:
        D.receive(c, "t")
    except D.PeerError as e:
        print("error:", e)
        sys.exit(2)
else:
    os.kill(os.getpid(), signal.SIGKILL)   # dies mid-run, before sending
"""


def test_a_killed_process_makes_the_other_exit_with_one_line():
    """Process 1 is killed (SIGKILL) while process 0 waits for its outputs: process 0
    exits on its own within the bound (no hang in the collective or at shutdown) with one
    line naming the lost peer."""
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _KILLED, addr, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT) for i in (0, 1)]
    try:
        out0, _ = procs[0].communicate(timeout=90)
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    # (gloo's own "[Gloo] Rank 0 is connected" log line is the runtime's, not an error)
    lines = [ln for ln in out0.splitlines() if ln.strip() and not ln.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("error: lost contact with another process")


_DIES_BEFORE_SENDING = (
    "import os, signal, sys\n"
    "from ntkexp.experiments import distributed as D\n"
    "D.send = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"  # computed, then dies
    "from ntkexp.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_killed_run_stops_in_one_line_and_a_rerun_resumes(tmp_path):
    """Two processes; process 1 is killed after computing its unit, before sending it.
    Process 0 (``ntkexp run``) exits within the bound with one line; rerunning on one
    process computes only the lost unit and leaves the uninterrupted run's results."""
    multi = str(tmp_path / "multi")
    single = str(tmp_path / "single")
    port = _free_port()
    dist = ["distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2"]
    cmds = [_cmd(multi, (*dist, f"distributed.process_id={i}")) for i in (0, 1)]
    cmds[1][2] = _DIES_BEFORE_SENDING
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(), cwd=ROOT) for c in cmds]
    try:
        out0 = procs[0].communicate(timeout=TIMEOUT_S)[0]
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1, out0[-2000:]
    lines = [ln for ln in out0.splitlines() if ln.strip() and not ln.startswith("[Gloo]")]
    assert len(lines) == 1 and "lost contact with another process" in lines[0], lines
    assert len(os.listdir(os.path.join(multi, "units"))) == 2  # process 0's unit, on disk
    _run_all([_cmd(multi)])  # resume on one process
    _run_all([_cmd(single)])
    r1, s1, _ = _load(single)
    r2, s2, m2 = _load(multi)
    assert m2["units_computed"] == 2 and m2["processes"] == 1
    assert s2 == s1
    for k in r1:
        if r1[k].dtype.kind in "fc":
            np.testing.assert_allclose(r2[k], r1[k], rtol=1e-6, atol=1e-6, err_msg=k)
