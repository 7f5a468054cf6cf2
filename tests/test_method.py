"""ReSSL module: loss composition, variants (predictor, InfoNCE warm-up, w_sim, multi-crop), update, DDP."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ressl.config import Config, ConfigError
from ressl.loss import infonce_loss, relation_loss, similarity_loss
from ressl.method import BACKBONE_PREFIX, ReSSL
from ressl.models import build_model

B, S = 4, 8


def _model(**over):
    kw = dict(backbone="resnet18_cifar", proj_hidden=32, proj_dim=16, predictor=False, pred_hidden=24,
              queue_size=32, tau_s=0.1, tau_t=0.04, w_rel=1.0, w_sim=0.0, infonce_tau=0.2,
              shuffle_bn_splits=1)  # exact comparisons below recompute the teacher on the whole batch
    kw.update(over)
    torch.manual_seed(0)
    return ReSSL(**kw).train()


def _tool_module(name):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ressl_tools_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _views(n_strong=1, sizes=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [S] * n_strong
    return torch.randn(B, 3, S, S, generator=g), [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def _qk(model, weak, view):
    with torch.no_grad():
        k = F.normalize(model.teacher(weak), dim=1)
    p = model.student(view)
    return F.normalize(p, dim=1), k, p


def test_forward_returns_loss_and_detached_scalar_metrics_without_touching_queue():
    model = _model()
    weak, strong = _views()
    queue_before = model.queue.buffer.clone()
    loss, metrics = model(weak, strong)
    assert loss.ndim == 0 and loss.requires_grad
    assert set(metrics) == {"loss", "loss_rel", "loss_nce", "loss_sim", "key_std"}
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert 0 < metrics["key_std"] <= 1  # per-dimension spread of unit-norm teacher keys
    assert torch.equal(model.queue.buffer, queue_before) and int(model.queue.ptr) == 0
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.backbone.conv1.weight.grad.abs().sum() > 0


def test_w_sim_zero_is_exactly_the_relation_loss():
    model = _model(w_sim=0.0)
    weak, strong = _views()
    loss, metrics = model(weak, strong)
    q, k, _ = _qk(model, weak, strong[0])
    expected = relation_loss(q, k, model.queue.buffer, 0.1, 0.04)
    assert torch.equal(loss.detach(), expected.detach())
    assert torch.equal(metrics["loss_rel"], expected.detach())


def test_w_rel_zero_is_exactly_the_similarity_loss_with_predictor():
    model = _model(w_rel=0.0, w_sim=1.0, predictor=True)
    weak, strong = _views()
    loss, metrics = model(weak, strong)
    _, k, p = _qk(model, weak, strong[0])
    expected = similarity_loss(p, k)
    assert torch.equal(loss.detach(), expected.detach())
    assert metrics["loss_rel"] > 0  # still logged, without gradient


def test_weighted_sum_of_both_terms():
    model = _model(w_rel=0.7, w_sim=0.3)
    weak, strong = _views()
    loss, m = model(weak, strong)
    torch.testing.assert_close(loss.detach(), 0.7 * m["loss_rel"] + 0.3 * m["loss_sim"])


def test_predictor_gets_gradients_and_is_absent_from_teacher():
    model = _model(predictor=True)
    weak, strong = _views()
    loss, _ = model(weak, strong)
    loss.backward()
    pred_params = list(model.student.predictor.parameters())
    assert pred_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred_params)
    assert model.teacher.predictor is None
    assert not any("predictor" in n for n in model.teacher.state_dict())
    student_keys = {n for n in model.student.state_dict() if not n.startswith("predictor.")}
    assert set(model.teacher.state_dict()) == student_keys
    pred_before = [p.detach().clone() for p in pred_params]
    model.update(0.0)  # EMA by name: skips the predictor, teacher == student's backbone + head
    assert all(torch.equal(a, b) for a, b in zip(pred_before, model.student.predictor.parameters()))
    for n, t in model.teacher.named_parameters():
        assert torch.equal(t, model.student.get_parameter(n)), n


def test_update_does_ema_then_enqueues_the_forward_keys():
    model = _model()
    weak, strong = _views()
    model(weak, strong)
    keys = model._keys.clone()
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01)
    model.update(0.9)
    torch.testing.assert_close(model.queue.buffer[:B], keys)
    assert int(model.queue.ptr) == B
    for t0, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    with pytest.raises(RuntimeError, match="before forward"):
        model.update(0.9)


def test_switch_from_infonce_to_relation_is_logged(caplog):
    model = _model()
    weak, strong = _views()
    with caplog.at_level("INFO", logger="ressl.method"):
        for w in (1.0, 1.0, 0.5, 0.0, 0.0):
            model(weak, strong, infonce_weight=w)
    msgs = [r.getMessage() for r in caplog.records if r.name == "ressl.method"]
    assert len(msgs) == 2 and "blending" in msgs[0] and "relation loss only" in msgs[1]


def test_infonce_weight_selects_and_blends_the_losses():
    model = _model()
    weak, strong = _views()
    q, k, _ = _qk(model, weak, strong[0])
    bank = model.queue.buffer
    nce, rel = infonce_loss(q, k, bank, 0.2), relation_loss(q, k, bank, 0.1, 0.04)
    loss1, m1 = model(weak, strong, infonce_weight=1.0)
    assert torch.equal(loss1.detach(), nce.detach())
    torch.testing.assert_close(m1["loss_rel"], rel.detach())
    loss_half, _ = model(weak, strong, infonce_weight=0.25)
    torch.testing.assert_close(loss_half.detach(), (0.75 * rel + 0.25 * nce).detach())
    with pytest.raises(ValueError, match="infonce_weight"):
        model(weak, strong, infonce_weight=1.5)


def test_zero_weight_terms_are_logged_but_built_without_autograd(monkeypatch):
    import ressl.method as method

    grad_on: dict[str, list[bool]] = {}
    for name in ("relation_loss", "infonce_loss", "similarity_loss"):
        real = getattr(method, name)

        def spy(*a, _real=real, _name=name):
            grad_on.setdefault(_name, []).append(torch.is_grad_enabled())
            return _real(*a)

        monkeypatch.setattr(method, name, spy)
    model = _model()  # w_sim = 0
    weak, strong = _views()
    _, metrics = model(weak, strong, infonce_weight=1.0)  # relation weight 0 during the warm-up
    assert grad_on == {"relation_loss": [False], "infonce_loss": [True], "similarity_loss": [False]}
    assert all(metrics[k] > 0 for k in ("loss_rel", "loss_nce", "loss_sim"))  # still measured for the log
    grad_on.clear()
    model(weak, strong, infonce_weight=0.5)
    assert grad_on == {"relation_loss": [True], "infonce_loss": [True], "similarity_loss": [False]}


def test_multicrop_loss_is_mean_over_crops_with_one_forward_per_size():
    model = _model(w_sim=0.5)
    sizes = [8, 6, 4]
    weak, strong = _views(sizes=sizes)
    calls = []
    hook = model.student.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    loss, metrics = model(weak, strong)
    assert [c[-1] for c in calls] == sizes and all(c[0] == B for c in calls)
    per_crop = [model(weak, [v])[0].detach() for v in strong]
    torch.testing.assert_close(loss.detach(), torch.stack(per_crop).mean())
    hook.remove()
    # Crops of equal size share one forward of 2B images.
    calls.clear()
    hook = model.student.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model(weak, [strong[0], strong[1], strong[0].flip(-1)])
    assert sorted(tuple(c) for c in calls) == [(B, 3, 6, 6), (2 * B, 3, 8, 8)]
    hook.remove()


def test_grouped_embeddings_match_separate_forwards():
    model = _model().eval()  # eval: BN statistics do not depend on how views are grouped
    _, strong = _views(sizes=[8, 4, 8])
    grouped = model._embed_student(strong)
    for g, v in zip(grouped, strong):
        torch.testing.assert_close(g, model.student(v), rtol=1e-5, atol=1e-5)


def test_param_groups_cover_student_only_and_skip_decay_on_norm_and_bias():
    model = _model(predictor=True)
    groups = model.param_groups(5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.student.parameters())
    assert not set(ids) & {id(p) for p in model.teacher.parameters()}
    decay = next(g for g in groups if g["weight_decay"] == 5e-4)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert all(p.ndim > 1 for p in decay["params"])
    bn = model.student.backbone.bn1
    assert {id(bn.weight), id(bn.bias), id(model.student.head[0].bias)} <= {id(p) for p in no_decay["params"]}
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def test_eval_backbone_is_student_and_prefixes_match_state_dict():
    model = _model()
    assert model.eval_backbone() is model.student.backbone
    keys = model.state_dict().keys()
    for prefix in BACKBONE_PREFIX.values():
        assert f"{prefix}conv1.weight" in keys
    assert {"queue.buffer", "queue.ptr"} <= set(keys)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_from_config_and_bad_arguments():
    cfg = Config(backbone="resnet18_cifar", proj_hidden=32, proj_dim=16, predictor=True, pred_hidden=8,
                 queue_size=64, batch_size=16, recipe="cifar32").validate()
    model = ReSSL.from_config(cfg)
    assert model.student.predictor is not None and model.queue.buffer.shape == (64, 16)
    assert model.student.head[-1].out_features == 16 and model.feat_dim == 512
    cfg.batch_size = 48
    with pytest.raises(ValueError, match="queue_size=64"):
        ReSSL.from_config(cfg)
    with pytest.raises(ValueError, match="both 0"):
        _model(w_rel=0.0, w_sim=0.0)
    with pytest.raises(KeyError, match="unknown backbone"):
        _model(backbone="resnet7")
    model = _model()
    weak, strong = _views()
    with pytest.raises(ValueError, match="batch"):
        model(weak, [strong[0][:2]])


# torch 2.14 deprecates broadcast_buffers in favour of forward_sync_buffers, which would still sync the
# queue at init; the loop keeps broadcast_buffers=False, so this test does too.
@pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning")
def test_trains_under_ddp_without_buffer_broadcast(tmp_path):
    """Two steps through DistributedDataParallel (1 gloo process): no unused-parameter errors."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model(predictor=True, w_sim=0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(model.param_groups(1e-4), lr=0.05, momentum=0.9)
        for step in range(2):
            weak, strong = _views(seed=step)
            loss, _ = ddp(weak, strong, infonce_weight=0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.update(0.99)
        assert int(model.queue.ptr) == 2 * B
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_teacher_keys_stay_in_input_order_with_group_statistics():
    """Teacher keys with shuffle-BN: each image embedded with its group's BN statistics (rows j, j+n, ...)
    and returned in input order, so k_b still belongs to weak_b."""
    model = _model(shuffle_bn_splits=2)
    weak, strong = _views()
    model(weak, strong)
    keys = model._keys
    with torch.no_grad():
        expected = torch.empty(B, keys.shape[1])
        expected[0::2] = F.normalize(model.teacher(weak[0::2]), dim=1)
        expected[1::2] = F.normalize(model.teacher(weak[1::2]), dim=1)
        whole = F.normalize(model.teacher(weak), dim=1)
    assert torch.allclose(keys, expected, atol=1e-6)
    assert not torch.allclose(keys, whole, atol=1e-4)  # group statistics differ from the whole batch's
    # student side: contiguous groups, so an image shares half of its BN group with its teacher group
    (out,) = model._embed_student(strong)
    halves = torch.cat([model.student(strong[0][: B // 2]), model.student(strong[0][B // 2:])])
    assert torch.allclose(out, halves, atol=1e-6)
    with pytest.raises(ValueError, match="shuffle_bn_splits"):
        _model(shuffle_bn_splits=0)


def test_teacher_keeps_its_own_bn_statistics():
    """The EMA averages parameters only: the teacher's running statistics come from its own forward
    passes on the weak views (as in the official code), so an evaluated teacher uses its own."""
    model = _model()
    weak, strong = _views()
    t_bn, s_bn = model.teacher.backbone.bn1, model.student.backbone.bn1
    before = t_bn.running_mean.clone()
    model(weak, strong)
    after_forward = t_bn.running_mean.clone()
    assert not torch.equal(after_forward, before)  # moved by the teacher's own train-mode forward
    with torch.no_grad():
        model.student.backbone.conv1.weight.mul_(3.0)
    model.student(strong[0] + 5.0)  # moves the student's statistics far away
    model.update(0.5)
    assert torch.equal(t_bn.running_mean, after_forward)
    assert not torch.allclose(t_bn.running_mean, s_bn.running_mean)


def test_shuffle_permutation_is_seeded_and_counted_in_the_state_dict():
    from ressl.method import shuffle_permutation

    p = shuffle_permutation(3, 5, 64)
    assert torch.equal(p, shuffle_permutation(3, 5, 64)) and sorted(p.tolist()) == list(range(64))
    assert not torch.equal(p, shuffle_permutation(3, 6, 64)) and not torch.equal(p, shuffle_permutation(4, 5, 64))
    model = _model(shuffle_seed=3)
    model.shuffle_calls = 11
    state = model.state_dict()
    assert state["_extra_state"] == {"shuffle_calls": 11}
    resumed = _model(shuffle_seed=3)
    resumed.load_state_dict(state)
    assert resumed.shuffle_calls == 11  # a resumed run draws the same permutations from here on


def test_decay_norm_bias_decays_every_parameter():
    model = _model()
    plain, every = model.param_groups(5e-4), model.param_groups(5e-4, decay_norm_bias=True)
    assert [len(g["params"]) for g in plain] == [len(g["params"]) for g in every]
    assert [g["weight_decay"] for g in plain] == [5e-4, 0.0]
    assert [g["weight_decay"] for g in every] == [5e-4, 5e-4]


# --- split BatchNorm: shuffle-BN in one forward ------------------------------------------------------
def _reference_student(model, views):
    """The n-forward shuffle-BN the split layers replaced: the student run on each contiguous chunk of rows
    (outside ``bn_splits`` the split layers are plain BatchNorm)."""
    out = [None] * len(views)
    by_size = {}
    for i, v in enumerate(views):
        by_size.setdefault(tuple(v.shape[1:]), []).append(i)
    for idx in by_size.values():
        x = torch.cat([views[i] for i in idx])
        z = torch.cat([model.student(c) for c in x.chunk(model.shuffle_bn_splits * len(idx))])
        for i, zi in zip(idx, z.split([views[i].shape[0] for i in idx])):
            out[i] = zi
    return out


def _reference_teacher(model, weak):
    """The n-forward teacher: one forward per strided group of rows j, j + n, ..., keys put back in order."""
    n = model.shuffle_bn_splits
    out = None
    for j in range(n):
        part = model.teacher(weak[j::n])
        out = part.new_empty((weak.shape[0], *part.shape[1:])) if out is None else out
        out[j::n] = part
    return out


def test_split_batchnorm_losses_and_gradients_equal_the_n_forward_implementation():
    """One forward per encoder and resolution gives the losses, keys and gradients of running the encoders
    on every BN group separately (predictor BN and multi-crop included). Float64 encoders: groups of 2
    images at layer4's 1x1 make BN's gradient ill-conditioned, so float32 agrees only to about 1e-4."""
    b = 8
    model = _model(backbone="resnet18_w32", shuffle_bn_splits=4, predictor=True, w_sim=0.5).double()
    reference = copy.deepcopy(model)
    reference._embed_student = lambda views: _reference_student(reference, views)
    reference._embed_teacher_local = lambda weak: _reference_teacher(reference, weak)
    g = torch.Generator().manual_seed(3)
    weak = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    strong = [torch.randn(b, 3, s, s, generator=g, dtype=torch.float64) for s in (8, 4, 8)]
    calls = []
    hooks = [model.student.backbone.register_forward_hook(lambda m, i, o: calls.append("student")),
             model.teacher.backbone.register_forward_hook(lambda m, i, o: calls.append("teacher"))]
    loss, metrics = model(weak, strong, infonce_weight=0.3)
    for h in hooks:
        h.remove()
    assert sorted(calls) == ["student", "student", "teacher"]  # one pass per resolution, one for the teacher
    ref_loss, ref_metrics = reference(weak, strong, infonce_weight=0.3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model._keys, reference._keys, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    grads = dict(reference.student.named_parameters())
    for name, p in model.student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-9, msg=name)
    # the groups matter: whole-batch statistics give another loss
    unsplit = _model(backbone="resnet18_w32", predictor=True, w_sim=0.5).double()
    unsplit.load_state_dict(model.state_dict())
    assert not torch.allclose(unsplit(weak, strong, infonce_weight=0.3)[0], loss, rtol=1e-3)


def _changed_rows(embed, x, row):
    """Rows of ``embed(x)`` that move when only input row ``row`` changes: its BN group."""
    with torch.no_grad():
        base = embed(x)
        moved = x.clone()
        moved[row] += 5.0
        return set(torch.nonzero((embed(moved) - base).abs().amax(dim=1) > 1e-5).flatten().tolist())


def test_student_and_teacher_groups_share_one_nth_of_each_image_group():
    """Student BN groups are contiguous rows, teacher groups strided rows: with n groups of B/n an image
    shares B/n^2 rows, 1/n of its group, with the other branch (MoCo's shuffle-BN on one device)."""
    b, n = 32, 4
    model = _model(shuffle_bn_splits=n)
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    for row in (0, 13, 30):
        student = _changed_rows(lambda v: model._embed_student([v])[0], x, row)
        teacher = _changed_rows(model._embed_teacher_local, x, row)
        assert student == set(range(row // (b // n) * (b // n), (row // (b // n) + 1) * (b // n)))
        assert teacher == set(range(row % n, b, n))
        assert len(student & teacher) == b // n**2 == len(student) // n


def test_split_model_state_dict_is_the_plain_models_and_exports_to_torchvision():
    """Same keys, shapes and EMA pairs as without splits; the exported backbone loads into the plain
    torchvision-built model and gives the same eval outputs."""
    export = _tool_module("export")
    model = _model(shuffle_bn_splits=8, predictor=True)
    plain = _model(predictor=True)
    assert {k: v.shape for k, v in model.state_dict().items() if k != "_extra_state"} == \
        {k: v.shape for k, v in plain.state_dict().items() if k != "_extra_state"}
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in plain.named_buffers()]
    weak = torch.randn(16, 3, 8, 8)
    model(weak, [weak.flip(-1)])  # train-mode forwards move the running statistics
    model.update(0.0)  # EMA: teacher parameters := student's; buffers are the teacher's own
    for (name, t), (_, s) in zip(model.teacher.named_parameters(), model.student.named_parameters()):
        assert torch.equal(t, s), name
    assert not torch.equal(model.teacher.backbone.bn1.running_mean, model.student.backbone.bn1.running_mean)
    state = export.backbone_state_dict(model.state_dict())
    assert export.check_loads(state, "resnet18_cifar") == ["fc.weight", "fc.bias"]
    target = build_model("resnet18_cifar")
    target.load_state_dict(state, strict=False)
    target.fc = torch.nn.Identity()
    model.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(weak), model.student.backbone(weak))


def test_split_batch_must_divide_into_groups():
    model = _model(shuffle_bn_splits=4)
    weak, strong = _views()  # B = 4
    with pytest.raises(ValueError, match="shuffle_bn_splits=4 needs a per-process batch divisible by 4, got 6"):
        model(torch.cat([weak, weak[:2]]), [torch.cat([strong[0], strong[0][:2]])])
    model.eval()
    model(weak[:3], [strong[0][:3]])  # eval: plain BatchNorm, any batch
    cfg = Config(backbone="resnet18_cifar", proj_hidden=32, proj_dim=16, queue_size=48, batch_size=12,
                 shuffle_bn_splits=8, recipe="cifar32").validate()
    with pytest.raises(ConfigError, match="shuffle_bn_splits=8 must divide the per-process batch 12"):
        ReSSL.from_config(cfg)
