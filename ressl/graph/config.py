"""Typed, strict configuration of an RGRL run: YAML preset -> flat dataclass, plus ``key=value`` overrides.

The defaults reproduce the authors' Cora run (their ``sh/run_RGRL.sh``); ``configs/rgrl-*.yaml`` change
only what differs. Values are parsed exactly as ``ressl.config`` parses the image trainer's (same preset
reader, same type coercion and messages); an unknown key or an impossible value is an error raised here,
before any graph is read.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ressl.config import ConfigError, apply_sources, coerce, resume_changes

__all__ = ["GraphConfig", "RESUME_CHANGEABLE", "graph_resume_changes", "load_graph_config"]

log = logging.getLogger(__name__)


@dataclass
class GraphConfig:
    # --- run -------------------------------------------------------------------------------------
    name: str = "rgrl-cora"  # logs and checkpoints go to {out_dir}/{name}/
    out_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # "auto" = continue from {out_dir}/{name}/last.pt if present; "no"; or a path
    data: str = "data/cora"  # directory holding graph.pt (make dataset DATA=planetoid|karate|digits-knn)
    num_threads: int = 0  # torch intra-op threads (0 = torch's default)

    # --- model -----------------------------------------------------------------------------------
    hidden_dim: int = 256  # GCN layer 1 width
    embed_dim: int = 128  # GCN layer 2 width = node embedding
    pred_hidden: int = 256  # student predictor: embed_dim -> pred_hidden -> PReLU -> embed_dim

    # --- augmentations (two views; p = probability of masking a feature column / dropping an edge)
    feat_mask_p1: float = 0.3
    feat_mask_p2: float = 0.4
    edge_drop_p1: float = 0.2
    edge_drop_p2: float = 0.4

    # --- anchors ---------------------------------------------------------------------------------
    num_anchors: int = 128  # global anchors per step, drawn with weight min(1, alpha^log(1+deg) + beta)
    anchor_alpha: float = 0.9  # < 1 favours low-degree nodes (1 = uniform)
    anchor_beta: float = 0.1  # floor added to every node's weight
    topk: int = 2  # local anchors: top-k entries of each node's personalised-PageRank row (GDC)
    ppr_alpha: float = 0.15  # PageRank teleport probability of the diffusion

    # --- method ----------------------------------------------------------------------------------
    tau_s: float = 0.1  # student temperature, global loss
    tau_t: float = 0.01  # teacher temperature, global loss
    tau_s_local: float = 0.1  # student temperature, local loss
    tau_t_local: float = 1.0  # teacher temperature, local loss
    lam: float = 1.0  # weight of the local loss
    momentum: float = 0.99  # EMA momentum of the teacher encoder (constant)

    # --- optimisation (AdamW, full batch: one step per epoch) -------------------------------------
    epochs: int = 400
    lr: float = 0.001
    weight_decay: float = 1e-5
    precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16

    # --- evaluation: logistic regression on frozen embeddings, random splits -----------------------
    eval_every: int = 100  # epochs between evaluations (0 = only before and after training)
    eval_before: bool = True  # also evaluate the random-init encoder
    eval_splits: int = 20  # random splits; accuracy is mean ± std over them
    eval_val_frac: float = 0.1
    eval_test_frac: float = 0.8  # the rest (10%) trains the classifier
    probe_epochs: int = 100  # Adam steps of the classifier
    probe_lr: float = 0.01

    # --- monitoring and saving -------------------------------------------------------------------
    log_every: int = 10  # steps between CSV / TensorBoard rows
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)

    def validate(self) -> GraphConfig:
        """Raise ConfigError for impossible values; return self for chaining."""
        errs = []
        positive = ["hidden_dim", "embed_dim", "pred_hidden", "num_anchors", "topk", "epochs", "eval_splits",
                    "probe_epochs", "log_every", "ckpt_every"]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in positive if getattr(self, k) <= 0]
        errs += [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("num_threads", "eval_every", "lam",
                                                                          "weight_decay", "anchor_beta")
                 if getattr(self, k) < 0]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in ("tau_s", "tau_t", "tau_s_local", "tau_t_local",
                                                                         "lr", "probe_lr")
                 if getattr(self, k) <= 0]
        errs += [f"{k} must be a probability in [0, 1], got {getattr(self, k)}"
                 for k in ("feat_mask_p1", "feat_mask_p2", "edge_drop_p1", "edge_drop_p2", "momentum")
                 if not 0.0 <= getattr(self, k) <= 1.0]
        if not 0.0 < self.anchor_alpha <= 1.0:
            errs.append(f"anchor_alpha must be in (0, 1], got {self.anchor_alpha}")
        if not 0.0 < self.ppr_alpha < 1.0:
            errs.append(f"ppr_alpha must be in (0, 1), got {self.ppr_alpha}")
        if not (0 <= self.eval_val_frac and 0 < self.eval_test_frac and self.eval_val_frac + self.eval_test_frac < 1):
            errs.append(f"eval_val_frac={self.eval_val_frac} and eval_test_frac={self.eval_test_frac} must leave "
                        "a training share (val >= 0, test > 0, val + test < 1)")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            errs.append(f"precision must be one of auto/no/bf16/fp16, got {self.precision!r}")
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys a resumed run may change: paths, cadence, speed, evaluation and the epoch budget (nothing saved
# in the checkpoint depends on them). Any other change would continue a different run; it is refused.
RESUME_CHANGEABLE = frozenset({
    "name", "out_dir", "resume", "data", "num_threads", "precision", "epochs", "eval_every", "eval_before",
    "eval_splits", "eval_val_frac", "eval_test_frac", "probe_epochs", "probe_lr", "log_every", "ckpt_every",
})


def graph_resume_changes(saved: dict[str, Any], cfg: GraphConfig
                         ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """``(applied, refused)`` changes between a checkpoint's config and ``cfg`` (``ressl.config.resume_changes``
    with this module's :data:`RESUME_CHANGEABLE`)."""
    return resume_changes(saved, cfg, RESUME_CHANGEABLE)


def load_graph_config(path: str | Path | None = None,
                      overrides: list[str] | dict[str, Any] | None = None) -> GraphConfig:
    """Read a YAML preset, apply overrides, validate. Logs every overridden key.

    Args:
        path: YAML file with a flat mapping of GraphConfig keys (None = the defaults).
        overrides: ``key=value`` strings (command line) or a dict; command-line values win over the file.
    """
    hints = typing.get_type_hints(GraphConfig)
    types_ = {f.name: hints[f.name] for f in fields(GraphConfig)}
    values: dict[str, Any] = {}

    def put(k: Any, v: Any, source: str) -> Any:
        if k not in types_:
            raise ConfigError(f"{source}: unknown key {k!r} (known keys: {', '.join(sorted(types_))})")
        values[k] = coerce(k, v, types_[k], source)
        return values[k]

    apply_sources(path, overrides, put)
    return GraphConfig(**values).validate()
