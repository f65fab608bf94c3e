"""A training run killed with SIGKILL while it writes a checkpoint resumes to exactly the
state an uninterrupted run ends in.

How the kill lands mid-write deterministically: bspf_ext.app.checkpoints has a test hook,
BSPF_TEST_STALL_CHECKPOINT="<epoch>:<marker file>". When the run writes that epoch's
checkpoint it puts half of the bytes into the temporary file (flushed and fsync'ed), creates
the marker file and sleeps. The test waits for the marker, sends SIGKILL, and so kills the
process at a known moment inside the write: the torn temporary file is on disk, the rename
has not happened. Every run is a subprocess with one thread, so the runs compare bitwise.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bspf_ext.app.checkpoints import STALL_CHECKPOINT_ENV, load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

TINY = ["--dataset", "digit-pairs", "--image-size", "16", "--patch-size", "4", "--train-size", "64",
        "--test-size", "32", "--block-size", "4", "--batch-size", "32", "--device", "cpu", "--epochs", "2",
        "--attention", "bspf", "--no-progress"]


def _command(out_dir, *extra):
    return [sys.executable, "-m", "bspf_ext", "train", *TINY, "--out-dir", str(out_dir), *extra]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _run(command, env):
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _kill_while_writing(command, env, marker, timeout=120.0):
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before its checkpoint write stalled: {process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run never reached the stalled checkpoint write")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert dict(a["config"], out_dir="") == dict(b["config"], out_dir="")
    # Wall-clock seconds are the only thing allowed to differ.
    assert [dict(h, seconds=0) for h in a["history"]] == [dict(h, seconds=0) for h in b["history"]]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert all(torch.equal(state[name], other[name]) for name in state), index


def test_sigkill_during_checkpoint_write_then_resume_is_bitwise_identical(tmp_path):
    whole, cut, marker = tmp_path / "whole", tmp_path / "cut", tmp_path / "stalled"
    _run(_command(whole), _env())

    _kill_while_writing(_command(cut), _env(**{STALL_CHECKPOINT_ENV: f"2:{marker}"}), marker)
    # Killed inside the write of epoch 2: epoch 1's checkpoint is whole, epoch 2's is torn.
    assert load_checkpoint(cut)["epoch"] == 1
    torn = cut / "checkpoint.pt.tmp"
    assert 0 < torn.stat().st_size
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(torn)

    resumed = _run(_command(cut, "--resume"), _env())
    assert "resuming bspf from epoch 1" in resumed.stdout
    _assert_same_state(load_checkpoint(whole), load_checkpoint(cut))
    assert not torn.exists()  # the resumed run's write replaced the torn file
