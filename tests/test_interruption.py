"""A run killed with SIGKILL and started again ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from problems import ridge, ridge_ll, ridge_ul
    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.ul import Implicit

    torch.manual_seed(0)
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=40)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=5)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=0.05))

    def batch(step):  # random minibatches: the RNG state must survive the kill
        time.sleep(float(sys.argv[2]))
        idx = torch.randint(0, 60, (30,))
        return (p.train[0][idx], p.train[1][idx]), p.val

    problem.run(batch, steps=30, checkpoint=sys.argv[1], checkpoint_every=1, progress=False)
    torch.save(p.ul_model.state_dict(), sys.argv[1] + ".final")
    """
)


def test_sigkill_and_restart_resume_bitwise(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    full = tmp_path / "full.pt"
    subprocess.run([sys.executable, str(script), str(full), "0"], check=True, timeout=300)

    killed = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.05"])
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it mid-run, after a few checkpoints
        if killed.exists() and torch.load(killed, weights_only=True)["step"] >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(killed, weights_only=True)["step"]
    assert 5 <= step < 30, step  # the kill did interrupt the run
    subprocess.run([sys.executable, str(script), str(killed), "0"], check=True, timeout=300)
    assert not list(tmp_path.glob("*.tmp"))  # a save cut short leaves no litter behind

    a = torch.load(str(full) + ".final", weights_only=True)
    b = torch.load(str(killed) + ".final", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
