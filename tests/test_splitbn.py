"""Split BatchNorm: per-group statistics in one pass against plain BatchNorm run on each group (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ressl.splitbn import SplitBatchNorm1d, SplitBatchNorm2d, bn_splits, convert_split_batchnorm


def _pair(bn_cls, c, seed=0, **kw):
    """A plain BatchNorm with non-trivial affine and running statistics, and its split twin (a deep copy)."""
    torch.manual_seed(seed)
    plain = bn_cls(c, **kw).double()
    with torch.no_grad():
        if plain.affine:
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-0.5, 0.5)
        if plain.track_running_stats:
            plain.running_mean.uniform_(-1, 1)
            plain.running_var.uniform_(0.5, 2)
    split = convert_split_batchnorm(copy.deepcopy(plain))
    return plain, split


def _reference(plain, x, g):
    """Plain BatchNorm on each strided group of rows (j, j + g, ...), outputs put back in input order; the
    running statistics each group would leave from the same start, averaged."""
    out = torch.empty_like(x)
    means, vars_ = [], []
    start = copy.deepcopy(plain)
    for j in range(g):
        bn = copy.deepcopy(start)
        bn.weight, bn.bias = plain.weight, plain.bias  # shared, so gradients add up over the groups
        out[j::g] = bn(x[j::g])
        means.append(bn.running_mean)
        vars_.append(bn.running_var)
    return out, torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm2d, (12, 5, 3, 4)), (nn.BatchNorm1d, (12, 6)),
                                          (nn.BatchNorm1d, (12, 6, 7))])
@pytest.mark.parametrize("g", [2, 3, 4])
def test_training_forward_backward_and_running_stats_match_per_group_batchnorm(bn_cls, shape, g):
    plain, split = _pair(bn_cls, shape[1])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + torch.arange(shape[0]).view(-1, *[1] * (
        len(shape) - 1))  # rows differ in mean, so each grouping gives different statistics
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ref_mean, ref_var = _reference(plain, x_ref, g)
    with bn_splits(split, g):
        out = split(x_new)
    assert torch.allclose(out, ref, atol=1e-10)
    assert not out._is_view()  # an in-place ReLU after it must not make autograd copy the gradient
    assert not torch.allclose(out, F.batch_norm(x, None, None, plain.weight, plain.bias, True), atol=1e-3)
    (ref * upstream).sum().backward()
    (out * upstream).sum().backward()
    assert torch.allclose(x_new.grad, x_ref.grad, atol=1e-10)
    assert torch.allclose(split.weight.grad, plain.weight.grad, atol=1e-10)
    assert torch.allclose(split.bias.grad, plain.bias.grad, atol=1e-10)
    assert torch.allclose(split.running_mean, ref_mean, atol=1e-12)
    assert torch.allclose(split.running_var, ref_var, atol=1e-12)
    assert int(split.num_batches_tracked) == 1  # one batch, one step: as the plain layer counts


def test_eval_and_one_split_are_plain_batchnorm():
    plain, split = _pair(nn.BatchNorm2d, 4)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    plain.eval()
    split.eval()
    with bn_splits(split, 4):  # eval ignores the splits: running statistics
        assert torch.equal(split(x), plain(x))
    plain.train()
    split.train()
    assert torch.equal(split(x), plain(x))  # num_splits is 1 outside bn_splits
    assert torch.equal(split.running_mean, plain.running_mean)
    assert split.num_splits == 1


def test_cumulative_average_and_no_affine_no_tracking():
    plain, split = _pair(nn.BatchNorm2d, 3, momentum=None)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    _, ref_mean, ref_var = _reference(plain, x, 2)
    with bn_splits(split, 2):
        split(x)
    assert torch.allclose(split.running_mean, ref_mean) and torch.allclose(split.running_var, ref_var)
    plain, split = _pair(nn.BatchNorm2d, 3, affine=False, track_running_stats=False)
    with bn_splits(split, 3):
        out = split(x)
    expected = torch.cat([F.batch_norm(x[j::3], None, None, training=True) for j in range(3)])
    assert torch.allclose(out, expected.view(3, 2, 3, 2, 2).transpose(0, 1).reshape(x.shape))


def test_channels_last_input_gives_the_same_values_in_the_same_layout():
    plain, split = _pair(nn.BatchNorm2d, 5)
    x = torch.randn(8, 5, 4, 3, dtype=torch.float64)
    with bn_splits(split, 4):
        expected = split(x)
        out = split(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-12)


def test_conversion_keeps_tensors_names_and_settings():
    """Same parameters and buffers (the very tensors), so state dicts, optimisers and the EMA see no change."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.01), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.SyncBatchNorm(6)))
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    params = [(n, p.data_ptr()) for n, p in model.named_parameters()]
    convert_split_batchnorm(model)
    assert type(model[1]) is SplitBatchNorm2d and type(model[3][2]) is SplitBatchNorm1d
    assert type(model[3][3]) is nn.SyncBatchNorm  # a subclass with its own forward is left alone
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.01)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert [(n, p.data_ptr()) for n, p in model.named_parameters()] == params
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.SyncBatchNorm(6)))
    plain.load_state_dict(model.state_dict())  # strict: a plain model loads a split model's state
    assert type(convert_split_batchnorm(nn.BatchNorm2d(2))) is SplitBatchNorm2d


def test_bad_group_counts_are_clear_errors():
    _, split = _pair(nn.BatchNorm2d, 2)
    with pytest.raises(ValueError, match="6 rows cannot form 4 equal BN groups"), bn_splits(split, 4):
        split(torch.randn(6, 2, 2, 2, dtype=torch.float64))
    assert split.num_splits == 1  # restored even when the forward raised
    with pytest.raises(ValueError, match="num_splits must be >= 1"), bn_splits(split, 0):
        pass
