"""Optimiser and learning-rate schedule of the default recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights get ``weight_decay``; BN parameters and biases (all 1-D tensors) get none."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


@dataclass
class WarmupSchedule:
    """Multiplier of the peak lr at optimiser step ``step``: linear warm-up, then cosine to 0 (``cosine``) or the
    one-cycle shape (warm-up from 1/25 of peak, cosine down to 1e-4 of peak, Smith & Topin 2017).

    A plain dataclass so that `torch.optim.lr_scheduler.LambdaLR` can save it in its state as numbers.
    """

    total_steps: int
    warmup_steps: int
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        start, end = (0.0, 0.0) if self.kind == "cosine" else (1 / 25, 1e-4)
        if step < self.warmup_steps:
            return start + (1 - start) * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_for(cfg: TrainConfig, steps_per_epoch: int) -> WarmupSchedule:
    total = cfg.epochs * steps_per_epoch
    return WarmupSchedule(total, min(total, round(cfg.warmup_epochs * steps_per_epoch)), cfg.schedule)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(cfg, steps_per_epoch))
