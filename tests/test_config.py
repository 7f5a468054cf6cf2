"""ressl/config.py: presets load, overrides apply, impossible values fail before any work, every loader option
is a declared key, and the tools print a config error as one line and exit 2."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.batch import LoaderConfig
from pipelines.spec import resolve_recipe
from ressl.config import RESUME_CHANGEABLE, Config, ConfigError, load_config, resume_changes

ROOT = Path(__file__).resolve().parents[1]
# rgrl-*.yaml are GraphConfig presets for tools/train_graph.py (tests/test_graph*.py load them)
CONFIGS = sorted(p for p in ROOT.glob("configs/*.yaml") if not p.stem.startswith("rgrl-"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_presets_load(path):
    cfg = load_config(path)
    assert cfg.queue_size % cfg.batch_size == 0
    spec = resolve_recipe(cfg.recipe, cfg.recipe_overrides)  # the preset's recipe overrides compile
    for key, value in cfg.recipe_overrides.items():
        view, *path = key.split(".")
        got = spec.view(view)
        for name in path:  # "strong.jitter.brightness" -> spec.view("strong").jitter.brightness
            got = getattr(got, name)
        assert got == (tuple(value) if isinstance(value, list) else value), key


def test_demo_recipe_is_digit_shaped():
    cfg = load_config("configs/demo.yaml")
    spec = resolve_recipe(cfg.recipe, cfg.recipe_overrides)
    assert [v.flip_p for v in spec.views] == [0.0, 0.0] and [v.size for v in spec.views] == [16, 16]
    assert spec.strong[0].blur_kernel == 1  # re-derived for 16 px: a 1-px window


def test_defaults_are_the_paper_imagenet_run():
    c = Config()
    assert (c.backbone, c.tau_s, c.tau_t, c.momentum, c.batch_size, c.lr, c.queue_size) == \
        ("resnet50", 0.1, 0.04, 0.999, 256, 0.05, 131072)


def test_overrides_are_typed():
    cfg = load_config(None, ["epochs=3", "lr=0.1", "channels_last=false", "name=x"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == 0.1 and cfg.channels_last is False and cfg.name == "x"


@pytest.mark.parametrize("override, message", [
    (["queue_size=1000"], "multiple of the global batch_size"),
    (["epochs=two"], "expects int"),
    (["momentum=1.5"], "momentum must be in [0, 1]"),
    (["no_such_key=1"], "unknown key 'no_such_key'"),
    (["lr=.nan"], "finite number"),
    (["lr=["], "key 'lr': value '[' is not valid YAML"),
    (["recipe.blur_p=0.5"], "recipe.<view>.<field>"),
    (["recipe_overrides={}"], "recipe.<view>.<field> keys"),
    (["backbone=resnet9000"], "resnet9000"),
    (["w_rel=0", "w_sim=0"], "no loss"),
    (["precision=fp8"], "precision"),
    (["lr"], "key=value"),
])
def test_bad_values_fail_fast(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: 3\nmomentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'momentun'"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/missing.yaml")


@pytest.mark.parametrize("text, key, value", [
    ("lr=1e-3", "lr", 1e-3), ("weight_decay=1e-4", "weight_decay", 1e-4), ("lr=1e9", "lr", 1e9),
    ("lr=5E-2", "lr", 0.05), ("epochs=1e2", "epochs", 100), ("lr=3", "lr", 3.0)
])
def test_values_parse_by_declared_type(text, key, value, tmp_path):
    """YAML 1.1 reads 1e-3 as a string; numbers must parse as the key's type on the command line and in files."""
    assert getattr(load_config(None, [text]), key) == value
    k, v = text.split("=")
    p = tmp_path / "c.yaml"
    p.write_text(f"{k}: {v}\n")
    got = getattr(load_config(p), key)
    assert got == value and type(got) is type(value)
    assert load_config(None, ["name=1e-3"]).name == "1e-3"  # a str key keeps the text as typed


def test_recipe_keys_collect_into_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recipe: cifar32\nrecipe.strong.blur_p: 0.5\nrecipe.weak.scale: [0.08, 1.0]\n")
    cfg = load_config(p, ["recipe.strong.jitter.brightness=1e-1", "recipe.strong.blur_p=0.25"])
    assert cfg.recipe_overrides == {"strong.blur_p": 0.25, "weak.scale": [0.08, 1.0], "strong.jitter.brightness": 0.1}


def test_to_overrides_rebuilds_the_config():
    cfg = load_config(None, ["lr=1e-3", "data=my data", "channels_last=false", "recipe=cifar32",
                             "recipe.weak.scale=[0.08,1.0]", "name=1e-3"])
    assert load_config(None, cfg.to_overrides()) == cfg
    assert load_config(None, Config().to_overrides()) == Config()


def test_resume_changes_split_applied_from_refused():
    old = load_config(None, ["lr=0.1", "batch_size=64", "queue_size=128", "recipe=cifar32"]).to_dict()
    new = load_config(None, ["lr=0.01", "batch_size=32", "queue_size=128", "recipe=cifar32", "epochs=300",
                             "recipe.strong.blur_p=0.5", "log_every=1"])
    applied, refused = resume_changes(old, new)
    assert applied == {"lr": (0.1, 0.01), "epochs": (200, 300), "log_every": (10, 1)}
    assert refused == {"batch_size": (64, 32), "recipe_overrides": ({}, {"strong.blur_p": 0.5})}
    # a key the checkpoint lacks counts as its default; a key this version lacks is refused
    del old["shuffle_bn_splits"]
    old["gone_key"] = 1
    applied, refused = resume_changes(old, load_config(None, ["lr=0.1", "batch_size=64", "queue_size=128",
                                                              "recipe=cifar32"]))
    assert applied == {} and refused == {"gone_key": (1, "<unknown key>")}
    assert RESUME_CHANGEABLE <= set(Config().to_dict())


def test_config_does_not_import_pipelines():
    """ressl/ knows no data pipeline: the tools check the recipe name and overrides against pipelines.spec."""
    code = "import sys, ressl.config; print('pipelines' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_duplicate_key_in_a_preset_is_refused_naming_both_lines(tmp_path):
    """A line appended to a preset must not silently win over the key already set above it."""
    demo = ROOT / "configs" / "demo.yaml"
    lines = demo.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, start=1) if line.startswith("lr:"))
    p = tmp_path / "demo.yaml"
    p.write_text("\n".join(lines) + "\nlr: 100.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: key 'lr' is set twice, on line {first} and on line {len(lines) + 1}"), msg
    dup = tmp_path / "nested.yaml"
    dup.write_text("recipe.weak.scale: [0.5, 1.0]\nepochs: 3\nrecipe.weak.scale: [0.2, 1.0]\n")
    with pytest.raises(ConfigError, match=r"key 'recipe.weak.scale' is set twice, on line 1 and on line 3"):
        load_config(dup)
    with pytest.raises(ConfigError, match=r"key 'a' is set twice, on line 1 and on line 1"):
        load_config(None, ["recipe.weak.scale={a: 1, a: 2}"])


@pytest.mark.parametrize("override, message", [
    (["batch_size=0", "queue_size=64"], "batch_size must be > 0, got 0"),
    (["seed=-1"], "seed must be in [0, 2**32 - 1]"),
    (["seed=1e23"], "seed must be in [0, 2**32 - 1]"),
    (["name="], "name must not be empty"),
    (["name= "], "name must not be empty"),
    (["name=../../etc"], "name='../../etc' must be a plain directory name"),
    (["name=.."], "must be a plain directory name"),
    (["name=a/b"], "must be a plain directory name"),
    (["name=" + "x" * 300], "name is 300 bytes long; at most 200"),
    (["out_dir="], "out_dir must not be empty"),
    (["overwrite=true"], "overwrite=true starts the run over: use it with resume=no"),
])
def test_run_keys_fail_fast(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_world_checks_split_batchnorm_groups():
    cfg = load_config(None, ["batch_size=8", "queue_size=64", "shuffle_bn_splits=16"])  # fine without a world
    with pytest.raises(ConfigError, match=r"shuffle_bn_splits=16 must divide the per-process batch 8"):
        cfg.check_world(1)
    cfg = load_config(None, ["batch_size=16", "queue_size=64", "shuffle_bn_splits=4"])
    cfg.check_world(2)  # 8 per process, 4 groups of 2
    with pytest.raises(ConfigError, match=r"per-process batch 4 \(batch_size=16 over 4 processes\)"):
        load_config(None, ["batch_size=16", "queue_size=64", "shuffle_bn_splits=8"]).check_world(4)


def test_every_loader_option_is_a_declared_config_key():
    declared = {f.name: f.default for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(LoaderConfig):
        assert f.name in declared, f"LoaderConfig.{f.name} is not a Config key"
        if f.default is not dataclasses.MISSING:
            assert declared[f.name] == f.default, (f.name, declared[f.name], f.default)
    cfg = load_config(None, ["num_workers=3", "ffcv_order=random", "ffcv_os_cache=false", "ffcv_batches_ahead=2"])
    lc = LoaderConfig.of(cfg)
    assert (lc.num_workers, lc.threads, lc.ffcv_order, lc.ffcv_os_cache, lc.ffcv_batches_ahead) == (
        3, 3, "random", False, 2)
    assert LoaderConfig.of(load_config(None, ["num_threads=5"])).threads == 5
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        lc.per_process_batch(3)


@pytest.mark.parametrize("argv, message", [
    (["tools/train.py", "lr=two"], "error: override: key 'lr' expects float"),
    (["tools/train.py", "recipe.strong.blur_p=2"], "error: recipe.strong.blur_p=2: ViewSpec 'strong'"),
    (["tools/eval.py", "--ckpt", "{bogus}", "--data", "."], "error: "),
    (["tools/export.py", "--ckpt", "{bogus}", "--out", "x.pth"], "error: "),
    (["tools/eval.py", "--ckpt", "{notes}", "--data", "."], "is not a trainer checkpoint: it is not a torch.save"),
    (["tools/eval.py", "--ckpt", "{missing}"], "error: checkpoint '{missing}' does not exist"),
    (["tools/export.py", "--ckpt", "{missing}", "--out", "x.pth"], "error: checkpoint '{missing}' does not exist"),
    (["tools/train.py", "--config", "configs/demo.yaml", "data={missing}", "out_dir={tmp}"],
     "error: dataset directory '{missing}' does not exist"),
])
def test_config_errors_print_the_message_alone_and_exit_2(argv, message, tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}, "config": {"bogus_key": 1}}, bogus)
    (tmp_path / "notes.pt").write_text("a text file named like a checkpoint")
    names = {"{bogus}": str(bogus), "{notes}": str(tmp_path / "notes.pt"), "{missing}": str(tmp_path / "missing"),
             "{tmp}": str(tmp_path)}
    for k, v in names.items():
        argv = [a.replace(k, v) for a in argv]
        message = message.replace(k, v)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-2000:]
    if ("eval" in argv[0] or "export" in argv[0]) and str(bogus) in argv:
        assert "bogus_key" in r.stderr
    assert "weights_only" not in r.stderr
