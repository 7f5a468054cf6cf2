"""The ReSSL module: student, EMA teacher, queue; ``forward`` returns the loss, ``update`` moves the rest.

One training step, as the loop drives it::

    loss, metrics = model(batch.weak, batch.strong, infonce_weight=w)   # teacher keys stored
    accelerator.backward(loss); optimizer.step()
    unwrapped.update(momentum)                                          # EMA, then enqueue keys

The queue is written only in :meth:`ReSSL.update`, after the backward pass, because autograd saved
the queue tensor for the student logits; writing it in ``forward`` would corrupt the gradient.
Variants are switches of the same module: the TPAMI predictor (student only) and InfoNCE warm-up,
the instance-similarity term (``w_sim``) and multi-crop (any number of strong views).
Shuffle-BN (``shuffle_bn_splits``) happens inside the split BatchNorm layers of :mod:`ressl.splitbn`:
each encoder runs once per step and resolution, its BN statistics taken per group of rows.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .ema import ema_update_
from .loss import infonce_loss, relation_loss, similarity_loss
from .models import Predictor, ProjectionHead, build_backbone
from .queue import FeatureQueue, gather_keys
from .splitbn import bn_splits, convert_split_batchnorm

if TYPE_CHECKING:
    from .config import Config

__all__ = ["Encoder", "ReSSL", "shuffle_permutation", "BACKBONE_PREFIX"]

log = logging.getLogger(__name__)

# State-dict prefixes of the two backbones inside ReSSL.state_dict() (tools/export.py reads them).
BACKBONE_PREFIX = {"student": "student.backbone.", "teacher": "teacher.backbone."}


class Encoder(nn.Module):
    """Backbone -> projection head (-> predictor, student only). Returns unnormalised [B, out_dim]."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.predictor = predictor

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.backbone(x))
        return self.predictor(z) if self.predictor is not None else z


def shuffle_permutation(seed: int, call: int, n: int) -> Tensor:
    """The cross-process shuffle-BN permutation of ``n`` gathered rows for the ``call``-th teacher forward.

    A pure function of its arguments, drawn on the CPU: every process computes the same permutation
    without a broadcast, and a resumed run (which restores ``call``) repeats the same shuffles.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + call)
    return torch.randperm(n, generator=g)


def _interleave(x: Tensor, groups: int) -> Tensor:
    """Rows reordered so that contiguous block k of ``x`` (``groups`` blocks) becomes rows k, k + groups, ...

    ``_interleave(_interleave(x, g), len(x) // g)`` is ``x``.
    """
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _term(weight: float, loss_fn: Callable[..., Tensor], *args: Tensor | float) -> Tensor:
    """``loss_fn(*args)``, with autograd only when ``weight > 0``: a zero-weight term is measured for the
    log (its value shows where a run stands) but adds nothing to the loss nor to the backward graph."""
    with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
        return loss_fn(*args)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ReSSL(nn.Module):
    """Relational self-supervised learning with an EMA teacher and a memory queue.

    Args:
        backbone: name in ``ressl.models.BACKBONES`` or any torchvision classification builder.
        proj_hidden, proj_dim: projection head ``feat -> proj_hidden -> ReLU -> proj_dim``.
        predictor: add the TPAMI predictor ``proj_dim -> pred_hidden -> proj_dim`` to the student.
        pred_hidden: predictor width.
        queue_size: K, rows of the queue; a multiple of the global batch.
        tau_s, tau_t: student / teacher temperatures of the relation loss.
        w_rel, w_sim: weights of the relation(+InfoNCE) term and of the instance term ``2 - 2 cos``.
        infonce_tau: temperature of the InfoNCE warm-up loss.
        shuffle_bn_splits: BatchNorm statistics come from this many groups of each process's batch,
            contiguous rows for the student and strided rows for the teacher (1 = off); the per-process
            batch must be a multiple of it. Without it the student can match the teacher through the
            batch's own BN statistics instead of the images, and a batch's embeddings collapse onto one
            direction (MoCo's shuffle-BN). Above 1 every BatchNorm of both encoders (the predictor's too)
            is a :mod:`~ressl.splitbn` layer that computes the groups' statistics in one forward pass, as
            MoCo's CIFAR demo does; in eval they are plain BatchNorm with the usual running statistics, and
            the state dict is the plain model's. With more than one process the teacher's batch is also
            shuffled across processes first, as in the official code: see :meth:`_embed_teacher`.
        shuffle_seed: seed of the cross-process permutation (the run's seed).

    Attributes:
        student: :class:`Encoder` with backbone, head and optional predictor (trained).
        teacher: deep copy of the student's backbone and head, no predictor, ``requires_grad=False``.
            It follows the module's train/eval mode, so its BatchNorm uses batch statistics during
            training, as in the paper, and those forward passes keep its own running statistics (the
            EMA averages parameters only), which an evaluated teacher uses.
        queue: :class:`~ressl.queue.FeatureQueue` of teacher embeddings.
    """

    def __init__(
        self,
        *,
        backbone: str,
        proj_hidden: int,
        proj_dim: int,
        predictor: bool,
        pred_hidden: int,
        queue_size: int,
        tau_s: float,
        tau_t: float,
        w_rel: float,
        w_sim: float,
        infonce_tau: float,
        shuffle_bn_splits: int = 2,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (("proj_hidden", proj_hidden), ("proj_dim", proj_dim), ("pred_hidden", pred_hidden),
                           ("tau_s", tau_s), ("tau_t", tau_t), ("infonce_tau", infonce_tau)):
            if value <= 0:
                raise ValueError(f"ReSSL: {key} must be > 0, got {value}")
        if w_rel < 0 or w_sim < 0 or w_rel + w_sim == 0:
            raise ValueError(f"ReSSL: w_rel and w_sim must be >= 0 and not both 0, got {w_rel} and {w_sim}")
        if shuffle_bn_splits < 1:
            raise ValueError(f"ReSSL: shuffle_bn_splits must be >= 1, got {shuffle_bn_splits}")
        net, feat_dim = build_backbone(backbone)
        head = ProjectionHead(feat_dim, proj_hidden, proj_dim)
        self.student = Encoder(net, head, Predictor(proj_dim, pred_hidden) if predictor else None)
        if shuffle_bn_splits > 1:  # BatchNorm layers (backbone and predictor) that can split the batch
            convert_split_batchnorm(self.student)
        self.teacher = Encoder(copy.deepcopy(self.student.backbone), copy.deepcopy(head))
        self.teacher.requires_grad_(False)
        self.queue = FeatureQueue(queue_size, proj_dim)
        self.feat_dim = feat_dim
        self.tau_s, self.tau_t, self.infonce_tau = tau_s, tau_t, infonce_tau
        self.shuffle_bn_splits = shuffle_bn_splits
        self.shuffle_seed = shuffle_seed
        self.shuffle_calls = 0  # cross-process shuffles so far; saved as extra state so a resume repeats them
        self.w_rel, self.w_sim = w_rel, w_sim
        self._keys: Tensor | None = None
        self._last_infonce_weight: float | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> ReSSL:
        """Build from the flat training config (the keys of the same names).

        Raises:
            ConfigError: ``shuffle_bn_splits`` does not divide the per-process batch.
        """
        world, _ = _world()  # Accelerate has started the process group by now, if there is one
        per_process = cfg.batch_size // world
        if per_process % cfg.shuffle_bn_splits:
            raise ConfigError(f"shuffle_bn_splits={cfg.shuffle_bn_splits} must divide the per-process batch "
                              f"{per_process} (batch_size={cfg.batch_size} over {world} processes): BN groups "
                              f"are equal slices of it")
        model = cls(
            backbone=cfg.backbone, proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim, predictor=cfg.predictor,
            pred_hidden=cfg.pred_hidden, queue_size=cfg.queue_size, tau_s=cfg.tau_s, tau_t=cfg.tau_t,
            w_rel=cfg.w_rel, w_sim=cfg.w_sim, infonce_tau=cfg.infonce_tau, shuffle_bn_splits=cfg.shuffle_bn_splits,
            shuffle_seed=cfg.seed,
        )
        model.queue.check_batch(cfg.batch_size)
        return model

    def _embed_student(self, views: list[Tensor]) -> list[Tensor]:
        """Student outputs per view, one forward per distinct resolution (multi-crop batching).

        Shuffle-BN, student side: each view's rows fall into ``shuffle_bn_splits`` contiguous groups
        (rows ``0 .. B/n - 1``, then the next ``B/n``, ...), each with its own BatchNorm statistics, in
        the same forward. The split layers group rows by index mod G, so the rows are interleaved
        before the forward (contiguous group k becomes rows k, k + G, ...) and put back after it.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(tuple(v.shape[1:]), []).append(i)
        out: list[Tensor | None] = [None] * len(views)
        for idx in groups.values():
            x = views[idx[0]] if len(idx) == 1 else torch.cat([views[i] for i in idx])
            g = self._bn_groups(views[idx[0]].shape[0]) * len(idx)
            if g == 1:
                z = self.student(x)
            else:
                xi = _interleave(x, g)
                if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                    xi = xi.contiguous(memory_format=torch.channels_last)  # keep the layout the model expects
                with bn_splits(self.student, g):
                    z = self.student(xi)
                z = _interleave(z, z.shape[0] // g)  # the inverse: rows back in input order
            for i, zi in zip(idx, z.split([views[i].shape[0] for i in idx])):
                out[i] = zi
        return out  # type: ignore[return-value]

    def _bn_groups(self, batch: int) -> int:
        """BN groups per view for a process batch of ``batch`` rows: ``shuffle_bn_splits`` in training."""
        n = self.shuffle_bn_splits if self.training else 1
        if batch % n:
            raise ValueError(f"shuffle_bn_splits={n} needs a per-process batch divisible by {n}, got {batch} "
                             f"rows (equal BN groups)")
        return n

    def _embed_teacher(self, weak: Tensor) -> Tensor:
        """Teacher outputs for ``weak`` in input order, BN statistics from shuffled groups (shuffle-BN).

        One process: teacher group j holds rows j, j+n, j+2n, ... while the student's groups are
        contiguous, so an image shares only 1/n of its BN group between the two branches (MoCo's
        shuffle-BN on one device). The loader shuffles every epoch, so no random draw is needed.

        Several processes (training only), as the official ReSSL / MoCo ``_batch_shuffle_ddp``: all
        processes' weak views are gathered, permuted by :func:`shuffle_permutation` (seeded, the same on
        every process), each process embeds its slice of the permuted batch (with the strided groups
        above), and the gathered outputs are un-permuted, so each process gets the keys of its own
        images, computed with BN statistics of images drawn from all processes.
        """
        world, rank = _world()
        if world == 1 or not self.training:
            return self._embed_teacher_local(weak)
        b = weak.shape[0]
        everyone = gather_keys(weak.contiguous())  # [world * b, 3, H, W]
        if everyone.shape[0] != world * b:
            raise RuntimeError(f"shuffle-BN needs the same batch on every process: this one has {b}, "
                               f"{everyone.shape[0]} rows were gathered from {world} processes")
        perm = shuffle_permutation(self.shuffle_seed, self.shuffle_calls, world * b).to(weak.device)
        self.shuffle_calls += 1
        mine = self._embed_teacher_local(everyone[perm.view(world, b)[rank]])
        shuffled = gather_keys(mine.contiguous())  # row i embeds image perm[i]
        return shuffled[torch.argsort(perm)].view(world, b, -1)[rank]

    def _embed_teacher_local(self, weak: Tensor) -> Tensor:
        """Teacher outputs for ``weak`` in input order, BN statistics from strided groups of rows.

        Group j holds rows j, j + n, j + 2n, ... (n = ``shuffle_bn_splits``): the grouping of the split
        BatchNorm layers, so the batch goes through unchanged in one forward.
        """
        n = self._bn_groups(weak.shape[0])
        if n == 1:
            return self.teacher(weak)
        with bn_splits(self.teacher, n):
            return self.teacher(weak)

    def get_extra_state(self) -> dict[str, int]:
        """Saved in ``state_dict()``: the count of cross-process shuffles, so a resumed run repeats them."""
        return {"shuffle_calls": self.shuffle_calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.shuffle_calls = int(state["shuffle_calls"])

    def forward(
        self, weak: Tensor, strong: list[Tensor], infonce_weight: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one step and detached 0-dim metrics (no host sync).

        Args:
            weak: [B, 3, H, W] weak view, teacher input.
            strong: strong views ``[B, 3, h_i, w_i]``, student inputs; views of equal size share a forward.
            infonce_weight: a in [0, 1]; per view the loss is
                ``w_rel * ((1 - a) * relation + a * infonce) + w_sim * similarity``, averaged over views.

        Returns:
            ``(loss, {"loss", "loss_rel", "loss_nce", "loss_sim", "key_std"})``; the teacher keys of ``weak``
            are kept for :meth:`update`. Terms with zero weight are left out of the loss and computed without
            gradient, for the log only.
        """
        if not strong:
            raise ValueError("ReSSL.forward needs at least one strong view")
        if not 0.0 <= infonce_weight <= 1.0:
            raise ValueError(f"infonce_weight must be in [0, 1], got {infonce_weight}")
        for i, v in enumerate(strong):
            if v.shape[0] != weak.shape[0]:
                raise ValueError(f"strong view {i} has batch {v.shape[0]}, the weak view {weak.shape[0]}")
        self._log_switch(infonce_weight)
        with torch.no_grad():
            k = F.normalize(self._embed_teacher(weak).float(), dim=1)  # [B, D] unit teacher keys
        self._keys = k  # enqueued by update(), after the backward pass
        bank = self.queue.buffer
        w_rel = self.w_rel * (1.0 - infonce_weight)  # the relation loss takes over from the InfoNCE warm-up
        w_nce = self.w_rel * infonce_weight
        total: Tensor | None = None
        logged = {name: torch.zeros((), device=k.device) for name in ("loss_rel", "loss_nce", "loss_sim")}
        outs = self._embed_student(strong)
        for p in outs:  # each student view against the one weak view
            q = F.normalize(p.float(), dim=1)
            rel = _term(w_rel, relation_loss, q, k, bank, self.tau_s, self.tau_t)  # ReSSL: relations to the queue
            nce = _term(w_nce, infonce_loss, q, k, bank, self.infonce_tau)  # TPAMI warm-up: k positive, queue negatives
            sim = _term(self.w_sim, similarity_loss, p, k)  # instance similarity 2 - 2 cos(p, k)
            view_loss = sum(w * v for w, v in ((w_rel, rel), (w_nce, nce), (self.w_sim, sim)) if w > 0)
            total = view_loss if total is None else total + view_loss
            for name, v in (("loss_rel", rel), ("loss_nce", nce), ("loss_sim", sim)):
                logged[name] = logged[name] + v.detach()
        n = len(outs)
        loss = total / n if n > 1 else total
        metrics = {"loss": loss.detach(), **{name: v / n for name, v in logged.items()},
                   # collapse monitor: per-dimension std of the unit teacher keys, ~1/sqrt(D) when spread, 0 collapsed
                   "key_std": k.std(dim=0).mean()}
        return loss, metrics

    def _log_switch(self, weight: float) -> None:
        """Log where the InfoNCE warm-up starts blending and where the relation loss takes over."""
        last, self._last_infonce_weight = self._last_infonce_weight, weight
        if last is None or last == weight:
            return
        if weight == 0.0:
            log.info("InfoNCE warm-up over: relation loss only from here on")
        elif last == 1.0:
            log.info("InfoNCE warm-up: blending into the relation loss (InfoNCE weight %.3f)", weight)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """After ``optimizer.step()``: EMA of backbone + head into the teacher, then enqueue the last keys."""
        if self._keys is None:
            raise RuntimeError("ReSSL.update called before forward: there are no teacher keys to enqueue")
        ema_update_(self.teacher, self.student, momentum)  # matched by name: the predictor is skipped
        self.queue.push(self._keys)
        self._keys = None

    def param_groups(self, weight_decay: float, decay_norm_bias: bool = False) -> list[dict]:
        """Student parameters for the optimiser: weights (ndim > 1), then norm weights and biases (1-D).

        The second group gets no decay by default (the official ImageNet code) or the same decay with
        ``decay_norm_bias`` (the official CIFAR code decays every parameter at 5e-4). Two groups either
        way, so optimiser states keep one layout.
        """
        decay, no_decay = [], []
        for p in self.student.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": weight_decay if decay_norm_bias else 0.0}]
        return [g for g in groups if g["params"]]

    def eval_backbone(self) -> nn.Module:
        """Backbone for kNN and linear evaluation: the student's.

        The official ReSSL code (mingkai-zheng/ReSSL, linear_eval.py) evaluates the query encoder
        (``encoder_q.net``), i.e. the student backbone, and so do we so that our numbers compare with
        the paper's. The teacher (``self.teacher.backbone``) stays available for export.
        """
        return self.student.backbone
