"""The data-parallel path on a CPU: two gloo processes under torchrun (FSDP2) follow the loss of
one process with the same global batch, and their sharded checkpoint resumes, on two processes
and on one."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from train_runs import TINY_MQAR, losses, train, train_subprocess

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.usefixtures("one_thread")]

# global batch 8 = 4 rows x 2 accumulation x 1 process = 4 rows x 1 x 2 processes
RUN = [*TINY_MQAR, "--batch-size", 4, "--steps", 4, "--save-every", 2, "--lr", "1e-2"]


def assert_close(got: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= rel * abs(loss), (step, got[step], loss)


def test_two_processes_follow_one_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(*RUN, "--grad-accum", 2, "--out", one) == 0
    result = train_subprocess(*RUN, "--out", two, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes (FSDP2)" in result.stdout
    # the same micro-batches, summed in another order: equal to float32 rounding
    assert_close(losses(two), losses(one), rel=1e-5)

    again = tmp_path / "two-resumed"
    result = train_subprocess("--resume", two / "checkpoints" / "step-000002", "--out", again, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(again), {s: v for s, v in losses(two).items() if s > 2}, rel=1e-6)

    # the sharded checkpoint read back by a single process (with twice the accumulation)
    single = tmp_path / "one-resumed"
    assert train("--resume", two / "checkpoints" / "step-000002", "--grad-accum", 2, "--out", single) == 0
    assert_close(losses(single), {s: v for s, v in losses(one).items() if s > 2}, rel=1e-5)
