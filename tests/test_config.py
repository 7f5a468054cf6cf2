"""Config: presets load, overrides apply, impossible values fail before any work."""

from pathlib import Path

import pytest

from ressl.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_presets_load(path):
    cfg = load_config(path)
    assert cfg.queue_size % cfg.batch_size == 0


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
    (["recipe=nope"], "unknown recipe 'nope'"),
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
