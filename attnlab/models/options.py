"""The model options' schema: the type and range of every option `create_model` takes, checked by `attnlab.schema`
before anything is built — an option the table below does not name has the type the network's constructor (or timm's
builder) declares. A bad value is one line naming the model, the option, the value and what is allowed."""

from __future__ import annotations

from typing import Annotated, Any

from timm.models import build_model_with_cfg
from torch import nn

from ..errors import AttnlabError
from ..schema import PositiveInt, Probability, Range, annotations, check

OPTIONS: dict[str, Any] = {
    "num_classes": Annotated[int, Range(0)],  # 0: no classifier (timm's convention for a feature extractor)
    "in_chans": PositiveInt,
    "attn_layer": str,
    "attn_kwargs": dict[str, Any] | None,
    "attn_where": str
    | PositiveInt
    | list[PositiveInt],  # "all", "last", "2,3", 2 or [2, 3]; stages that exist: restrict_attention
    "merge": str,
    "merge_args": dict[str, Any] | None,
    "post_act": bool,
    "aw": bool | dict[str, Any],
    "check_finite": bool,
    "drop_rate": Probability,
    "drop_path_rate": Probability,
    "drop_block_rate": Probability,
    "block_args": dict[str, Any],
}


def check_model_options(name: str, kwargs: dict[str, Any], model_cls: type) -> dict[str, Any]:
    """``kwargs`` of model ``name`` (built by ``model_cls``) checked by type; unknown names are `_check_options`'s."""
    hints = {**annotations(build_model_with_cfg), **annotations(model_cls), **OPTIONS}
    try:
        return {key: check(key, value, hints.get(key, Any)) for key, value in kwargs.items()}
    except AttnlabError as e:
        raise AttnlabError(f"{name}: {e}") from None


def check_buildable(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build model ``name`` once with ``kwargs`` (10 classes, 3 channels unless they say otherwise), so that an option
    only the built network can refuse (``attn_where`` beyond its last stage) fails before anything is written; the
    network built."""
    from . import create_model

    try:
        return create_model(name, **{"num_classes": 10, "in_chans": 3, **kwargs})
    except AttnlabError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:  # from timm or torch: their first line, named
        raise AttnlabError(f"{name}: {(str(err) or type(err).__name__).splitlines()[0]}") from None
