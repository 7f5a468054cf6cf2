"""FeatureQueue: start state, FIFO order, wrap-around, size check and the all-gather hook."""

import pytest
import torch
import torch.nn.functional as F

import ressl.queue as queue_mod
from ressl.queue import FeatureQueue


def test_starts_random_and_normalised():
    q = FeatureQueue(12, 5)
    assert q.buffer.shape == (12, 5) and q.buffer.dtype == torch.float32
    torch.testing.assert_close(q.buffer.norm(dim=1), torch.ones(12))
    assert int(q.ptr) == 0
    assert set(dict(q.named_buffers())) == {"buffer", "ptr"}


def test_fifo_and_wrap_around_against_reference():
    torch.manual_seed(0)
    q = FeatureQueue(8, 3)
    ref = q.buffer.double().clone()
    ptr = 0
    for step in range(7):  # 7 pushes of 2 rows into 8 slots: wraps around once and then some
        keys = F.normalize(torch.randn(2, 3), dim=1)
        q.push(keys)
        for i in range(2):
            ref[(ptr + i) % 8] = keys[i].double()
        ptr = (ptr + 2) % 8
        assert int(q.ptr) == ptr, step
        torch.testing.assert_close(q.buffer.double(), ref)
    # The newest push sits just before ptr, the oldest surviving one at ptr.
    torch.testing.assert_close(q.buffer[(int(q.ptr) - 2) % 8], keys[0])


def test_size_must_be_multiple_of_global_batch():
    q = FeatureQueue(10, 4)
    with pytest.raises(ValueError, match="queue_size=10 must be a multiple of the global batch"):
        q.push(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        q.push(torch.randn(5, 3))
    q.check_batch(5)


def test_push_writes_all_processes_keys(monkeypatch):
    # Stand-in for two processes: the gather returns this process's keys and a peer's.
    peer = F.normalize(torch.randn(2, 4), dim=1)
    monkeypatch.setattr(queue_mod, "gather_keys", lambda k: torch.cat([k, peer]))
    q = FeatureQueue(8, 4)
    mine = F.normalize(torch.randn(2, 4), dim=1)
    q.push(mine)
    torch.testing.assert_close(q.buffer[:4], torch.cat([mine, peer]))
    assert int(q.ptr) == 4


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert queue_mod.gather_keys(x) is x
