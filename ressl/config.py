"""Typed, strict configuration: YAML preset -> flat dataclass, plus ``key=value`` overrides.

The defaults below reproduce the paper's ImageNet run (ReSSL, RN50, 200 epochs, batch 256); presets in
``configs/`` change only what differs. An unknown key, a wrongly typed value or an impossible
combination is an error raised here, before any data is read or any model is built.

Values parse by the declared type, with YAML 1.2 numbers (``lr=1e-3`` is a float, where YAML 1.1 would
read a string). ``recipe.<view>.<field>=value`` keys (e.g. ``recipe.strong.blur_p=0.5``) are collected
into ``recipe_overrides``; this module knows no recipe, so the tools check the name and the overrides
against ``pipelines.spec`` before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["BACKENDS", "FFCV_ORDERS", "RESUME_CHANGEABLE", "Config", "ConfigError", "RunError", "coerce", "load_config",
           "parse_overrides", "read_preset", "resume_changes", "run_tool"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file, key or value that cannot work; the message names it."""


class RunError(RuntimeError):
    """A run stopped by a condition its message explains in full (a NaN loss, a disk that is full): the
    tools print the message alone and exit with status 2, as for a :class:`ConfigError`."""


# Longest run name: it is a directory name (255 bytes on Linux file systems) that also gets a
# ".replaced-YYYYmmdd-HHMMSS" sibling when a run is overwritten.
MAX_NAME_BYTES = 200
# The loader vocabulary a config may name, declared here (the lowest floor) so that the config checks and
# the pipelines read one list: ressl never imports pipelines.
BACKENDS = ("torchvision", "dali", "ffcv")  # "auto" picks among them (pipelines.resolve_backend)
FFCV_ORDERS = ("auto", "random", "quasi_random", "sequential")


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------
    name: str = "imagenet"  # run name: logs and checkpoints go to {out_dir}/{name}/
    out_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # "auto" = continue from {out_dir}/{name}/last.pt if present; "no"; or a path
    overwrite: bool = False  # with resume=no: move an existing run's outputs to {name}.replaced-DATE/ first

    # --- data ------------------------------------------------------------------------------------
    data: str = "data/imagenet"  # directory with train/ val/ (ImageFolder) and/or train.beton, train.rec
    train_split: str = "train"  # STL-10 trains on "unlabeled"
    backend: str = "auto"  # auto | torchvision | dali | ffcv
    recipe: str = "imagenet224"  # augmentation preset in pipelines/spec.py
    # changes on top of the preset, from recipe.<view>.<field> keys ({"strong.blur_p": 0.5}); not set directly
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 8  # loader PROCESSES per training process (torchvision DataLoader workers; 0 = in-process)
    num_threads: int = 0  # loader THREADS per training process (DALI CPU threads, FFCV threads); 0 = num_workers
    ffcv_order: str = "auto"  # FFCV visiting order: auto | random | quasi_random (one process only) | sequential
    ffcv_os_cache: bool = True  # FFCV: let the OS page cache hold the .beton (false = FFCV's own process cache)
    ffcv_batches_ahead: int = 3  # FFCV: batches prepared in advance
    dali_reader_workers: int = 0  # DALI: processes that read files and draw parameters ahead (0 = in the loop)
    channels_last: bool = True

    # --- model -----------------------------------------------------------------------------------
    backbone: str = "resnet50"  # name in ressl.models.BACKBONES or any torchvision classification builder
    proj_hidden: int = 4096  # projection head: feat -> proj_hidden -> ReLU -> proj_dim (no BN)
    proj_dim: int = 512
    predictor: bool = False  # TPAMI: asymmetric MLP predictor on the student only
    pred_hidden: int = 4096

    # --- method ----------------------------------------------------------------------------------
    queue_size: int = 131072  # K, memory queue of teacher embeddings; multiple of batch_size
    tau_s: float = 0.1  # student temperature
    tau_t: float = 0.04  # teacher temperature (sharper)
    momentum: float = 0.999  # EMA momentum m (start value for the cosine schedule)
    momentum_schedule: str = "constant"  # constant | cosine (m -> 1 over training)
    w_rel: float = 1.0  # weight of the relation loss
    w_sim: float = 0.0  # instance-similarity term 2 - 2 cos(p, k) (p = predictor output when predictor is on)
    warmup_infonce_epochs: int = 0  # TPAMI: InfoNCE instead of the relation loss for these epochs
    infonce_blend_epochs: int = 0  # linear blend InfoNCE -> relation over this many epochs after warm-up
    infonce_tau: float = 0.2
    shuffle_bn_splits: int = 2  # BN statistics from this many groups of each process's batch (1 = off; see ReSSL)

    # --- optimisation ----------------------------------------------------------------------------
    epochs: int = 200
    batch_size: int = 256  # global batch (all processes); each loads batch_size / num_processes
    lr: float = 0.05  # learning rate per 256 images: actual lr = lr * batch_size / 256
    weight_decay: float = 1e-4  # not applied to norm weights and biases unless decay_norm_bias
    decay_norm_bias: bool = False  # True: decay every parameter (the official CIFAR code: 5e-4 on all)
    sgd_momentum: float = 0.9
    warmup_epochs: int = 5  # linear warm-up, then cosine to 0
    max_steps: int = 0  # stop after this many optimiser steps (0 = epochs * steps per epoch)

    # --- speed -----------------------------------------------------------------------------------
    precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    compile: bool = False  # torch.compile the student and teacher

    # --- monitoring and saving -------------------------------------------------------------------
    log_every: int = 10  # steps between CSV / TensorBoard rows
    knn_every: int = 10  # epochs between kNN monitors (0 = only at the start and end)
    knn_k: int = 200
    knn_t: float = 0.07
    knn_before: bool = False  # also measure kNN before training (the demo shows before/after)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)

    def validate(self) -> Config:
        """Raise ConfigError for impossible values; return self for chaining."""
        errs = self._run_errors()
        positive = ["shuffle_bn_splits", "batch_size", "epochs", "queue_size", "proj_hidden", "proj_dim",
                    "pred_hidden", "log_every", "ckpt_every", "knn_k"]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in positive if getattr(self, k) <= 0]
        nonneg = ["num_workers", "num_threads", "dali_reader_workers", "warmup_epochs", "warmup_infonce_epochs",
                  "infonce_blend_epochs", "max_steps",
                  "knn_every", "w_rel", "w_sim", "weight_decay"]
        errs += [f"{k} must be >= 0, got {getattr(self, k)}" for k in nonneg if getattr(self, k) < 0]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in ("tau_s", "tau_t", "infonce_tau", "lr", "knn_t")
                 if getattr(self, k) <= 0]
        if not 0.0 <= self.momentum <= 1.0:
            errs.append(f"momentum must be in [0, 1], got {self.momentum}")
        if self.momentum_schedule not in ("constant", "cosine"):
            errs.append(f"momentum_schedule must be 'constant' or 'cosine', got {self.momentum_schedule!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            errs.append(f"precision must be one of auto/no/bf16/fp16, got {self.precision!r}")
        if self.ffcv_order not in FFCV_ORDERS:
            errs.append(f"ffcv_order must be one of {'/'.join(FFCV_ORDERS)}, got {self.ffcv_order!r}")
        if self.ffcv_batches_ahead < 1:
            errs.append(f"ffcv_batches_ahead must be >= 1, got {self.ffcv_batches_ahead}")
        if self.backend not in ("auto", *BACKENDS):
            errs.append(f"backend must be one of {'/'.join(('auto', *BACKENDS))}, got {self.backend!r}")
        if self.w_rel == 0 and self.w_sim == 0:
            errs.append("w_rel and w_sim are both 0: there is no loss to train")
        if self.batch_size > 0 and self.queue_size % self.batch_size:
            errs.append(f"queue_size={self.queue_size} must be a multiple of the global batch_size={self.batch_size}")
        try:
            from ressl.models import check_backbone_name

            check_backbone_name(self.backbone)
        except KeyError as e:
            errs.append(str(e.args[0]))
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        return self

    def _run_errors(self) -> list[str]:
        """Name, output directory and seed: the run directory must be one new entry inside ``out_dir``."""
        errs = []
        name = self.name
        if not name.strip():
            errs.append("name must not be empty: it is the run directory inside out_dir")
        elif name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            errs.append(f"name={name!r} must be a plain directory name (no '/', not '.' or '..'): runs are "
                        f"written to out_dir/name, and out_dir={self.out_dir!r} says where")
        elif len(name.encode()) > MAX_NAME_BYTES:
            errs.append(f"name is {len(name.encode())} bytes long; at most {MAX_NAME_BYTES} (it is a directory name)")
        elif not name.isprintable():
            errs.append(f"name={name!r} contains control characters")
        if not self.out_dir.strip():
            errs.append("out_dir must not be empty (default: runs)")
        if not 0 <= self.seed < 2**32:
            errs.append(f"seed must be in [0, 2**32 - 1] (NumPy's and the loaders' seed range), got {self.seed}")
        if self.overwrite and self.resume != "no":
            errs.append(f"overwrite=true starts the run over: use it with resume=no (got resume={self.resume!r})")
        return errs

    def check_world(self, num_processes: int) -> None:
        """Checks that need the process count (known only once Accelerate has started)."""
        if self.batch_size % num_processes:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by {num_processes} processes")
        per_process = self.batch_size // num_processes
        if per_process % self.shuffle_bn_splits:
            raise ConfigError(f"shuffle_bn_splits={self.shuffle_bn_splits} must divide the per-process batch "
                              f"{per_process} (batch_size={self.batch_size} over {num_processes} processes): "
                              "BN groups are equal slices of it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_overrides(self) -> list[str]:
        """``key=value`` arguments that rebuild this config from the defaults (every key that differs):
        with ``shlex.join`` a command line that works whatever file or overrides produced the config."""
        default = Config()
        out = [f"{k}={_format(getattr(self, k))}" for k in _field_types()
               if k != "recipe_overrides" and getattr(self, k) != getattr(default, k)]
        out += [f"recipe.{k}={_format(v)}" for k, v in self.recipe_overrides.items()]
        return out


# Keys that may differ between a checkpoint and the config that resumes it. Each is read afresh on
# resume: the optimiser's lr / weight decay / momentum are set from the current config, the schedule
# is a pure function of the step and the current total, the rest is cadence, speed or paths. Every
# other key (batch, model, queue, method, recipe and its overrides, seed, and any key added later
# unless listed here) fixes what the checkpoint holds or how the run continues, and must not change.
RESUME_CHANGEABLE = frozenset({
    "name", "out_dir", "resume", "overwrite", "data", "backend", "num_workers", "num_threads", "ffcv_os_cache",
    "ffcv_batches_ahead", "dali_reader_workers", "channels_last", "precision", "compile",
    "epochs", "max_steps", "lr", "weight_decay", "sgd_momentum", "warmup_epochs",
    "log_every", "knn_every", "knn_k", "knn_t", "knn_before", "ckpt_every",
})


def resume_changes(saved: dict[str, Any], cfg: Config, changeable: frozenset[str] = RESUME_CHANGEABLE
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compare a checkpoint's config with the current one.

    Args:
        saved: ``Config.to_dict()`` stored in the checkpoint (a key it lacks counts as its default).
        cfg: the config of the run that resumes (another tool's config dataclass works too: its defaults
            are ``type(cfg)()``).
        changeable: the keys that may differ (that tool's own set).

    Returns:
        ``(applied, refused)``: ``{key: (checkpoint value, current value)}`` for keys in
        ``changeable`` and for all others. A key the checkpoint has but this version does not
        know is refused with current value ``"<unknown key>"``.
    """
    applied: dict[str, tuple[Any, Any]] = {}
    refused: dict[str, tuple[Any, Any]] = {}
    now = cfg.to_dict()
    default = type(cfg)().to_dict()
    for k in sorted(set(saved) | set(now)):
        if k not in now:
            refused[k] = (saved[k], "<unknown key>")
            continue
        old = saved.get(k, default[k])
        if _normal(old) != _normal(now[k]):
            (applied if k in changeable else refused)[k] = (old, now[k])
    return applied, refused


def _normal(v: Any) -> Any:
    """Tuples and lists compare equal (YAML gives lists, specs hold tuples)."""
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, dict):
        return {k: _normal(x) for k, x in v.items()}
    return v


def _format(v: Any) -> str:
    """A value as the command line parses it back (YAML flow style, no spaces)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


class DuplicateKeyError(ConfigError):
    """A YAML mapping sets one key twice (message: the key and both lines)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-3`` and ``1e9`` are numbers, not strings as in YAML 1.1) and
    no duplicate keys: PyYAML lets the last of two equal keys win silently, so a line appended to a preset
    would change the run without a word. YAML 1.2 requires unique keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise DuplicateKeyError(f"key {key!r} is set twice, on line {first} and on line {line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One command-line value as YAML 1.2 would read it (``"1e-3"`` -> 0.001, ``"[0.08,1.0]"`` -> a list)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"value {text!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"value {text!r}: {e}") from None


def run_tool(main: Callable[[], Any]) -> Any:
    """Run a tool's entry point; a :class:`ConfigError`, a :class:`RunError` or a missing file (a
    checkpoint, a dataset, an index: ``FileNotFoundError``, whose message names the path) prints its
    message alone and exits with status 2.

    For ``if __name__ == "__main__":`` blocks: a bad key, value or path is the user's to fix, and a
    traceback would bury the one line that says which.
    """
    try:
        return main()
    except (ConfigError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def coerce(key: str, value: Any, typ: type, source: str) -> Any:
    """Convert ``value`` to the field's type; strings from the command line are parsed as YAML 1.2."""
    if isinstance(value, str) and typ is not str:
        try:
            value = parse_value(value)
        except ConfigError as e:
            raise ConfigError(f"{source}: key {key!r}: {e}") from None
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            raise ConfigError(f"{source}: key {key!r} expects a finite number, got {value!r}")
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: key {key!r} expects {typ.__name__}, got {value!r} ({type(value).__name__})")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["lr=0.1", "epochs=5"]`` -> ``{"lr": "0.1", "epochs": "5"}``; anything else is an error."""
    out = {}
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"override {a!r} is not of the form key=value")
        k, v = a.split("=", 1)
        out[k.strip().lstrip("-")] = v
    return out


def read_preset(path: str | Path) -> dict[Any, Any]:
    """A YAML preset file as its flat mapping (YAML 1.2 numbers); keys are not checked here."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.load(f, Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except DuplicateKeyError as e:
            raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def apply_sources(path: str | os.PathLike | None, overrides: list[str] | dict[str, Any] | None,
                  put: Callable[[Any, Any, str], Any]) -> None:
    """Feed a preset's keys, then the overrides, to ``put(key, value, source)``; each override is logged
    with the value ``put`` returns (the parsed one). Shared by every config dataclass's loader."""
    if path is not None:
        for k, v in read_preset(path).items():
            put(k, v, str(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        log.info("override %s = %r", k, put(k, v, "override"))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML preset, apply overrides, validate. Logs every overridden key.

    Args:
        path: YAML file with a flat mapping of Config keys and ``recipe.<view>.<field>`` keys
            (None = the defaults).
        overrides: ``key=value`` strings (command line) or a dict; command-line values win over the file.
    """
    types_ = _field_types()
    values: dict[str, Any] = {}
    recipe: dict[str, Any] = {}

    def put(k: Any, v: Any, source: str) -> Any:
        if not isinstance(k, str):
            raise ConfigError(f"{source}: key {k!r} is not a string")
        if k.startswith("recipe."):
            sub = k[len("recipe."):]
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", sub):
                raise ConfigError(f"{source}: {k!r} is not of the form recipe.<view>.<field> "
                                  "(e.g. recipe.strong.blur_p, recipe.strong.jitter.brightness)")
            try:
                recipe[sub] = parse_value(v) if isinstance(v, str) and source == "override" else v
            except ConfigError as e:
                raise ConfigError(f"{source}: key {k!r}: {e}") from None
            return recipe[sub]
        if k == "recipe_overrides":
            raise ConfigError(f"{source}: set recipe changes as recipe.<view>.<field> keys, not {k!r}")
        if k not in types_:
            known = ", ".join(sorted(set(types_) - {"recipe_overrides"}))
            raise ConfigError(f"{source}: unknown key {k!r} (known keys: {known}, recipe.<view>.<field>)")
        values[k] = coerce(k, v, types_[k], source)
        return values[k]

    apply_sources(path, overrides, put)
    if recipe:
        values["recipe_overrides"] = recipe
    return Config(**values).validate()
