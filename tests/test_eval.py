"""Evaluation: features, kNN against a brute-force reference, linear probes, t-SNE, tools/eval.py, export."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ressl.config import Config, ConfigError
from ressl.eval import (
    extract_features,
    knn_accuracy,
    linear_probe,
    linear_probe_augmented,
    load_checkpoint,
    topk_accuracy,
    tsne_plot,
)
from ressl.method import ReSSL
from ressl.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"ressl_tools_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blobs(n_per_class, classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + spread * torch.randn(len(y), dim, generator=g), y


def _ref_knn(train_f, train_y, test_f, test_y, k, t, c):
    correct = 0
    for i in range(len(test_f)):
        sims = [(float(test_f[i] @ train_f[j]), int(train_y[j])) for j in range(len(train_f))]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * c
        for s, label in sims[:k]:
            votes[label] += torch.tensor(s / t, dtype=torch.float64).exp().item()
        correct += int(max(range(c), key=lambda j: votes[j]) == int(test_y[i]))
    return 100.0 * correct / len(test_f)


def test_extract_features_normalises_and_restores_mode():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5))
    net.train()
    batches = [(torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 2, 2), torch.tensor([1, 1]))]
    feats, labels = extract_features(net, batches)
    assert feats.shape == (5, 5) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 1, 1] and net.training
    raw, _ = extract_features(net, batches, normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="no batches"):
        extract_features(net, [])


def test_knn_matches_bruteforce_reference_and_chunking():
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    train_y = torch.randint(0, 4, (40,), generator=g)
    test_f = F.normalize(torch.randn(25, 6, generator=g), dim=1)
    test_y = torch.randint(0, 4, (25,), generator=g)
    for k in (1, 5, 200):
        ref = _ref_knn(train_f.double(), train_y, test_f.double(), test_y, min(k, 40), 0.07, 4)
        assert knn_accuracy(train_f, train_y, test_f, test_y, k=k, t=0.07) == pytest.approx(ref)
        assert knn_accuracy(train_f, train_y, test_f, test_y, k=k, t=0.07, chunk=4) == pytest.approx(ref)


def test_knn_on_clusters_is_perfect_and_checks_inputs():
    x, y = _blobs(20, 5, 8, seed=1)
    xt, yt = _blobs(10, 5, 8, seed=2)
    assert knn_accuracy(F.normalize(x, dim=1), y, F.normalize(xt, dim=1), yt, k=10) == 100.0
    with pytest.raises(ValueError, match="features must be"):
        knn_accuracy(x, y, xt[:, :3], yt)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_accuracy(x, y, xt, yt, num_classes=2)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 2, 1]), ks=(1, 2))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3)


def test_linear_probe_on_separable_features_is_near_perfect():
    x, y = _blobs(60, 10, 16, seed=3, spread=0.5)
    xt, yt = _blobs(20, 10, 16, seed=4, spread=0.5)
    acc = linear_probe(x * 50 + 7, y, xt * 50 + 7, yt, epochs=20, batch_size=64)  # any scale/offset works
    assert acc["top1"] >= 99.0 and acc["top5"] == 100.0
    chance = linear_probe(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], xt, yt,
                          epochs=5, batch_size=64)
    assert chance["top1"] < 50.0


class _EpochViews:
    """A probe train loader: each epoch its own noisy "crops" of the same images, shuffled by epoch."""

    def __init__(self, x, y, batch, noise=0.2):
        self.x, self.y, self.batch, self.noise, self.epochs = x, y, batch, noise, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return -(-len(self.y) // self.batch)

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epochs[-1])
        order = torch.randperm(len(self.y), generator=g)
        x = self.x[order] + self.noise * torch.randn(self.x.shape, generator=g)
        for i in range(0, len(x), self.batch):
            yield x[i:i + self.batch].view(-1, 3, 2, 2), self.y[order][i:i + self.batch]


def _flat_backbone():
    backbone = torch.nn.Flatten()  # "images" [B, 3, 2, 2] -> their 12 values
    backbone.weight = torch.nn.Parameter(torch.zeros(1))  # a device to read, as real backbones have
    return backbone


def test_augmented_linear_probe_trains_on_new_views_each_epoch_and_reports_best():
    x, y = _blobs(40, 4, 12, seed=5)
    xt, yt = _blobs(10, 4, 12, seed=6)
    train = _EpochViews(x, y, batch=32)
    acc = linear_probe_augmented(_flat_backbone(), train, [(xt.view(-1, 3, 2, 2), yt)], num_classes=4,
                                 feat_dim=12, epochs=15, batch_size=32)
    assert train.epochs == list(range(15))  # set_epoch before every epoch: new crops each time
    assert acc["top1"] >= 95.0 and acc["best_top1"] >= acc["top1"] and 1 <= acc["best_epoch"] <= 15
    first = [b[0] for b in (train.set_epoch(0) or train)]
    second = [b[0] for b in (train.set_epoch(1) or train)]
    assert not torch.equal(first[0], second[0])


def test_augmented_linear_probe_needs_set_epoch():
    x, y = _blobs(4, 2, 12, seed=5)
    with pytest.raises(TypeError, match="set_epoch"):
        linear_probe_augmented(_flat_backbone(), [(x.view(-1, 3, 2, 2), y)], [(x.view(-1, 3, 2, 2), y)],
                               num_classes=2, feat_dim=12, epochs=1)


def test_tsne_writes_png(tmp_path):
    x, y = _blobs(15, 3, 8, seed=7)
    out = tsne_plot(x, y, tmp_path / "sub" / "tsne.png", class_names=["a", "b", "c"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["tsne.png"]  # no temp file left behind
    with pytest.raises(ValueError, match=".png"):
        tsne_plot(x, y, tmp_path / "tsne.jpg")


def _checkpoint(tmp_path, backbone="resnet18_cifar", **cfg_over):
    cfg = Config(backbone=backbone, proj_hidden=32, proj_dim=16, pred_hidden=16, queue_size=32, batch_size=16,
                 recipe="cifar32", **cfg_over).validate()
    torch.manual_seed(0)
    model = ReSSL.from_config(cfg)
    with torch.no_grad():  # make student and teacher differ, as after training
        for p in model.student.backbone.parameters():
            p.add_(0.01)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "optimizer": {}, "step": 3, "epoch": 0},
               path)
    return path, model


@pytest.mark.parametrize("backbone,tv", [("resnet18", torchvision.models.resnet18),
                                         ("mobilenet_v3_large", torchvision.models.mobilenet_v3_large)])
def test_export_loads_into_torchvision_model_with_only_classifier_missing(tmp_path, backbone, tv):
    ckpt, model = _checkpoint(tmp_path, backbone=backbone)
    out = tmp_path / "export" / "backbone.pth"
    missing = _tool("export").main(["--ckpt", str(ckpt), "--out", str(out)])
    state = torch.load(out, weights_only=True)
    target = tv()
    result = target.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(missing)
    assert all(k.split(".")[0] in ("fc", "classifier") for k in result.missing_keys)
    assert set(result.missing_keys) == set(target.state_dict()) - set(model.student.backbone.state_dict())
    for k, v in model.student.backbone.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_export_cifar_stem_and_teacher_branch(tmp_path):
    ckpt, model = _checkpoint(tmp_path, backbone="resnet18_cifar")
    out = tmp_path / "teacher.pth"
    _tool("export").main(["--ckpt", str(ckpt), "--out", str(out), "--branch", "teacher"])
    state = torch.load(out, weights_only=True)
    result = build_model("resnet18_cifar").load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(state["conv1.weight"], model.teacher.backbone.conv1.weight)
    assert not torch.equal(state["conv1.weight"], model.student.backbone.conv1.weight)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"model": {}}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="'model' and 'config'"):
        load_checkpoint(tmp_path / "a.pt")
    torch.save({"model": {}, "config": {"lr": 0.1, "bogus": 1}}, tmp_path / "b.pt")
    with pytest.raises(ConfigError, match="bogus"):
        load_checkpoint(tmp_path / "b.pt")
    # not a checkpoint: say what the file is not, and never pass on torch's advice to load it unsafely
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save(argparse.Namespace(lr=0.1), tmp_path / "pickled.pt")
    for name, what in (("notes.pt", "not a torch.save file"), ("pickled.pt", "Python objects other than tensors")):
        with pytest.raises(ValueError, match="is not a trainer checkpoint") as err:
            load_checkpoint(tmp_path / name)
        assert what in str(err.value) and "weights_only" not in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__


def test_eval_tool_end_to_end_on_image_folder(tmp_path, image_folder):
    ckpt, _ = _checkpoint(tmp_path, data=str(image_folder), predictor=True)
    result = _tool("eval").main(["--ckpt", str(ckpt), "--probe-epochs", "3", "--num-workers", "0",
                                 "--batch-size", "8", "--device", "cpu"])
    saved = json.loads((tmp_path / "eval.json").read_text())["results"]["student/full/step3"]
    assert saved["num_train"] == 24 and saved["num_val"] == 12
    for key in ("knn_top1", "linear_top1", "linear_top5"):
        assert 0.0 <= saved[key] <= 100.0 and saved[key] == result[key]
    assert saved["linear_top5"] == 100.0  # 3 classes: top-5 covers all
    assert saved["probe"].startswith("full (paper") and 1 <= saved["linear_best_epoch"] <= 3  # the default
    assert saved["linear_best_top1"] >= saved["linear_top1"]
    assert (saved["knn_k"], saved["knn_t"]) == (200, 0.07)  # the run's values, recorded
    assert (tmp_path / "tsne-student-step3.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(ckpt, weights_only=True)
    del state["model"]["_extra_state"]  # a checkpoint from before the shuffle counter still evaluates
    torch.save(state, ckpt)
    fast = _tool("eval").main(["--ckpt", str(ckpt), "--probe", "fast", "--probe-epochs", "3", "--num-workers", "0",
                               "--batch-size", "8", "--device", "cpu", "--no-tsne", "--out-dir", str(tmp_path / "f")])
    assert fast["probe"].startswith("fast (cached") and "linear_best_top1" not in fast
    assert "| linear top-1, fast (cached" in _tool("eval").format_table(fast)
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        _tool("eval").main(["--ckpt", str(ckpt), "--data", str(tmp_path), "--no-tsne"])


def _sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_eval_results_are_keyed_by_producer_and_never_overwritten(tmp_path, image_folder):
    ckpt, _ = _checkpoint(tmp_path, data=str(image_folder))
    common = ["--ckpt", str(ckpt), "--probe-epochs", "2", "--num-workers", "0", "--batch-size", "8", "--device",
              "cpu", "--no-tsne"]
    eval_json = tmp_path / "eval.json"
    fast = _tool("eval").main([*common, "--probe", "fast"])
    teacher = _tool("eval").main([*common, "--branch", "teacher", "--probe", "none", "--knn-k", "3"])
    results = json.loads(eval_json.read_text())["results"]
    assert list(results) == ["student/fast/step3", "teacher/none/step3"]
    assert results["student/fast/step3"]["linear_top1"] == fast["linear_top1"]  # the probe figures survive
    assert "linear_top1" not in results["teacher/none/step3"] and results["teacher/none/step3"]["knn_k"] == 3
    for r in results.values():
        assert r["step"] == 3 and r["ckpt_sha256"] == _sha256(ckpt) and r["ckpt"] == str(ckpt)
    assert teacher["key"] == "teacher/none/step3"
    # the same producer again replaces its own entry only; a later checkpoint adds its own
    again = _tool("eval").main([*common, "--probe", "fast", "--knn-k", "5"])
    state = torch.load(ckpt, weights_only=True)
    state["step"] = 10
    torch.save(state, ckpt)
    _tool("eval").main([*common, "--probe", "none"])
    results = json.loads(eval_json.read_text())["results"]
    assert list(results) == ["teacher/none/step3", "student/fast/step3", "student/none/step10"]
    assert results["student/fast/step3"]["knn_k"] == 5 == again["knn_k"]
    assert results["student/none/step10"]["ckpt_sha256"] == _sha256(ckpt) != results["teacher/none/step3"][
        "ckpt_sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or lock file left


def test_eval_json_of_an_earlier_version_is_kept_and_a_foreign_one_refused(tmp_path, image_folder):
    ckpt, _ = _checkpoint(tmp_path, data=str(image_folder))
    flat = {"knn_top1": 50.0, "probe": _tool("eval").PROBES["full"], "linear_top1": 60.0, "branch": "student"}
    (tmp_path / "eval.json").write_text(json.dumps(flat))
    _tool("eval").main(["--ckpt", str(ckpt), "--probe", "none", "--num-workers", "0", "--batch-size", "8",
                        "--device", "cpu", "--no-tsne"])
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results["student/full/step-unrecorded"] == flat and "student/none/step3" in results
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON.*not overwritten"):
        _tool("eval").main(["--ckpt", str(ckpt), "--probe", "none", "--device", "cpu"])
    assert (tmp_path / "eval.json").read_text() == "{not json"


def test_checkpoint_without_a_step_is_keyed_by_its_hash(tmp_path, image_folder):
    ckpt, _ = _checkpoint(tmp_path, data=str(image_folder))
    state = torch.load(ckpt, weights_only=True)
    del state["step"]
    torch.save(state, ckpt)
    res = _tool("eval").main(["--ckpt", str(ckpt), "--probe", "none", "--num-workers", "0", "--batch-size", "8",
                              "--device", "cpu"])
    assert res["key"] == f"student/none/sha256-{_sha256(ckpt)[:12]}" and res["step"] is None
    assert (tmp_path / f"tsne-student-sha256-{_sha256(ckpt)[:12]}.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--knn-k", "-5"], "--knn-k must be >= 1"),
    (["--knn-k", "0"], "--knn-k must be >= 1 (omit it to use the run's knn_k)"),
    (["--knn-t", "0"], "--knn-t must be a finite number > 0"),
    (["--probe-lr", "nan"], "--probe-lr must be a finite number > 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--device", "tpu"], "--device expects cpu, cuda or cuda:N"),
    (["--out-dir", "FILE"], "is a file; expected a directory"),
    (["--out-dir", "FILE/sub"], "cannot be created or written: .* is a file, not a directory"),
])
def test_bad_options_fail_before_any_feature_is_extracted(tmp_path, image_folder, argv, message):
    ckpt, _ = _checkpoint(tmp_path, data=str(image_folder))
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]

    def no_loader(*a, **kw):
        pytest.fail("a loader was built before the bad option was refused")

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _tool("eval").main(["--ckpt", str(ckpt), "--device", "cpu", *argv], build_eval_loader=no_loader)


def test_cuda_device_without_cuda_is_refused_before_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(ConfigError, match="--device cuda: torch sees no CUDA device"):
        _tool("eval").main(["--ckpt", str(tmp_path / "missing.pt"), "--device", "cuda"])  # before the file is read


def test_eval_command_line_errors_are_one_line_exit_2(tmp_path, capsys):
    from ressl.config import run_tool

    ckpt, _ = _checkpoint(tmp_path)
    with pytest.raises(SystemExit) as exc:  # what `python tools/eval.py ...` runs
        run_tool(lambda: _tool("eval").main(["--ckpt", str(ckpt), "--knn-k", "-5", "--device", "cpu"]))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --knn-k must be >= 1 (omit it to use the run's knn_k), got -5\n"
