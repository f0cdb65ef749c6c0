"""Loss and accuracy of a model on a split, and the running tally that training and evaluation both keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle, Split, batches
from ..errors import AttnlabError
from . import distributed


class Tally:
    """Loss sum, correct predictions and images, kept on the device in float64 and summed over ranks at the end."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.sums += torch.stack(
            [
                loss_sum.double(),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=self.sums.device),
            ]
        )

    def total(self, dist: distributed.Dist) -> tuple[float, float, float]:
        """(loss sum, correct, count) over every rank."""
        loss_sum, correct, count = dist.all_sum(self.sums).tolist()
        return loss_sum, correct, count


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse labels outside ``[0, num_classes)`` in one line."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise AttnlabError(
            f"{where}labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    bundle: DataBundle,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dist: distributed.Dist | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (summed over ranks when distributed)."""
    dist = dist or distributed.Dist()
    device = torch.device(device)
    num_classes = getattr(model, "num_classes", None) or getattr(getattr(model, "module", None), "num_classes", None)
    if num_classes:
        check_labels(split.labels, num_classes, "")
    was_training = model.training
    model.eval()
    tally = Tally(device)
    where = {"rank": dist.rank, "world_size": dist.world_size, "device": device, "channels_last": channels_last}
    for x, y in batches(split, bundle, batch_size, train=False, **where):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        tally.add(F.cross_entropy(logits.float(), y, reduction="sum").double(), logits, y)
    loss_sum, correct, count = tally.total(dist)
    model.train(was_training)
    if count == 0:
        raise AttnlabError(f"{bundle.name}: the evaluation split is empty")
    return {"loss": loss_sum / count, "acc": correct / count}
