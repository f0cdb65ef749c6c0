"""The entry grammar: ``model[key=value,key=value]``, how `compare` names a compared network and how ``train
--model`` and ``detect train --model`` accept one.

``fmm_resnet20[merge=gate]`` is the model ``fmm_resnet20`` built with ``merge="gate"``;
``cram_resnet20[cram.equivariance=0.1]`` trains ``cram_resnet20`` with the option ``equivariance=0.1`` of the
mechanism ``cram`` (a key ``MECHANISM.OPTION``, the run's ``mechanisms`` mapping). A key that is a field of the run
configuration (`TrainConfig`, `attnlab.detection.DetectConfig`) changes the recipe of that entry only; any other key
is a model option. Values are read as YAML (``0.1`` a number, ``[1,2]`` a list, ``gate`` a string); any other dotted
key sets one key of a dict model option (``merge_args.residual_bias=1``). The whole text is the entry's display
name, so several entries of one model can be compared side by side.

NAME is any name `attnlab.create_model` builds: attnlab's, timm's registry (``efficientnet_b0``) or torchvision's
as ``torchvision:NAME``. The model option ``attention=NAME`` converts the built network (`attnlab.convert`): every
attention it has is swapped for the registered attention NAME (``efficientnet_b0[attention=eca]``: its SE gates
become ECA; ``attention=none`` removes them), after its ``weights`` / ``pretrained`` are loaded, and
``attention_args.KEY=VALUE`` sets that attention's options. The other modes of `attnlab.convert` follow, one key
each, with their options as ``KEY_args.OPTION=VALUE``: ``insert=NAME`` (an attention into every residual block,
``torchvision:resnet18[insert=se,insert_args.rd_ratio=0.5]``), and, on timm and torchvision networks, ``aw=3x3|GLOB``
(AW-convolutions in place of the chosen convolutions, ``resnet18[aw=3x3,aw_args.gate=linear]``) and ``merge=NAME``
(FMM merges in place of the residual additions, ``resnet18[merge=gate]``). On attnlab's own names ``aw``, ``merge``
and ``merge_args`` stay the options of the blocks it builds (``fmm_resnet20[merge=gate]``): the same network, built
rather than converted. In a folder name (`Entry.slug`) the ``:`` of
``torchvision:NAME`` becomes a dash: ``torchvision-mobilenet_v3_small``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import AttnlabError
from ..io import yaml_scalar
from .config import TrainConfig

PER_RUN_FIELDS = ("model", "dataset", "seed", "out", "model_kwargs", "dataset_options")
"""Run configuration fields a comparison sets per run; an entry's options may not name them."""


@dataclass(frozen=True)
class Entry:
    """One network: display ``name``, registered ``model``, its ``model_kwargs`` and recipe overrides (``train``,
    its ``mechanisms`` among them)."""

    name: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The entry's folder name: ``:`` (``torchvision:NAME``), brackets and commas become dashes, anything unusual
        an underscore."""
        text = self.name.replace(":", "-").replace("[", "-").replace(",", "-").replace("]", "")
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets or braces: ``"a[x=1,y=2],b"`` → ``["a[x=1,y=2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise AttnlabError(f"unbalanced ']' in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise AttnlabError(f"unbalanced '[' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_entry(text: str, config: type = TrainConfig) -> Entry:
    """``"name[key=value,...]"`` → `Entry` (see the module docstring); a key that is a field of ``config`` (the run
    configuration class) is a training setting, ``MECHANISM.OPTION`` a mechanism's option."""
    from ..layers import list_training_hooks
    from ..models import check_model_name

    text = text.strip()
    match = re.fullmatch(r"((?:torchvision:)?[A-Za-z0-9_.-]+)(?:\[(.*)\])?", text, flags=re.S)
    if not match:
        raise AttnlabError(f"model entry {text!r}: expected NAME or NAME[key=value,...]")
    model, options = match.group(1), match.group(2)
    check_model_name(model)
    config_fields = {f.name for f in dataclasses.fields(config)}
    mechanisms = set(list_training_hooks())
    model_kwargs: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for item in split_top(options or ""):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AttnlabError(f"model entry {text!r}: option {item!r} is not key=value")
        parsed = yaml_scalar(value)
        if key in PER_RUN_FIELDS or key == "mechanisms":
            raise AttnlabError(f"model entry {text!r}: '{key}' is set by the comparison, not per entry")
        head, _, rest = key.partition(".")
        if rest and head in mechanisms:  # cram.equivariance=0.1 → mechanisms={"cram": {"equivariance": 0.1}}
            train.setdefault("mechanisms", {}).setdefault(head, {})[rest] = parsed
        elif rest:  # merge_args.residual_bias=1 → merge_args={"residual_bias": 1}
            target = model_kwargs.setdefault(head, {})
            if head in config_fields or not isinstance(target, dict) or not rest.isidentifier():
                raise AttnlabError(f"model entry {text!r}: '{key}' is not an option of a model option")
            target[rest] = parsed
        else:
            (train if key in config_fields else model_kwargs)[key] = parsed
    if options is not None and not (model_kwargs or train):
        raise AttnlabError(f"model entry {text!r}: empty brackets")
    return Entry(name=text, model=model, model_kwargs=model_kwargs, train=train)


def unfold_model_entry(args: Any, config: type = TrainConfig) -> None:
    """Let a command line's ``--model`` be an entry as `compare` and its reports write it (``attnlab train --model
    'fmm_resnet20[merge=mul_bn,merge_args.residual_bias=1]'``): ``args.model`` becomes the model, the entry's model
    options and mechanism options go before the ``--model-arg`` and ``--mechanism`` pairs (so those win), and its
    training settings fill the flags not given."""
    if not args.model or "[" not in args.model:
        return
    entry = parse_entry(args.model, config)
    args.model = entry.model
    args.model_kwargs = [*entry.model_kwargs.items(), *(getattr(args, "model_kwargs", None) or [])]
    for key, value in entry.train.items():
        if key == "mechanisms":
            pairs = [(f"{name}.{option}", v) for name, options in value.items() for option, v in options.items()]
            args.mechanisms = [*pairs, *(getattr(args, "mechanisms", None) or [])]
        elif getattr(args, key, None) is None:
            setattr(args, key, value)
