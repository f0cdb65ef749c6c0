"""``--compile``: a model compiled in place with torch.compile (inductor), and the fall-back to eager where it cannot.

The model is compiled in place (`nn.Module.compile`), not wrapped: the module, its submodules' names and its
``state_dict`` keys stay what they are, so checkpoints, weights and analyses see the model they always saw; only its
calls go through the compiled graph. Where the model or the backend cannot compile (no C++ compiler for inductor's CPU
kernels, an op inductor refuses, a double backward through a compiled graph, ...), `run_or_fall_back` retries eagerly
and prints one warning line: the work gets done either way.

Mode ``default``: the compile modes measured equal per step within the noise (`benchmarks/compile_modes.py`; the
numbers are in docs/MEASUREMENTS.md), so the cheapest to compile wins. ``reduce-overhead`` adds CUDA graphs, nothing on
CPU; on CUDA they would hold memory for every batch shape a run sees (training, evaluation, the last partial batch).

The dynamo settings a compiled model needs (`RECOMPILE_LIMIT`, guards on module hooks) hold only during that model's
own calls (`dynamo_settings`): compiling a model changes nothing for the rest of the process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

from .._compat import compiled_call, dynamo_config, dynamo_config_patch, set_compiled_call

MODE = "default"
T = TypeVar("T")


RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per code object. It counts them across every instance of a class, so a process that compiles
many differently built models of one class (compare over many entries, bench, analyze over several runs) would pass
torch's default of 8 and silently run the later models eagerly."""


def dynamo_settings() -> contextlib.AbstractContextManager:
    """The dynamo settings of a compiled model's calls, as a context: at least `RECOMPILE_LIMIT` graphs per code
    object, and guards on module hooks (by default dynamo does not guard on them: a hook added after the first compiled
    call, as `capture_attention` and CRAM's equivariance term add, would never be called; guarding recompiles once)."""
    limit = max(dynamo_config().recompile_limit, RECOMPILE_LIMIT)
    return dynamo_config_patch(recompile_limit=limit, skip_nnmodule_hook_guards=False)


def compile_module(model: nn.Module, *, mode: str = MODE, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place (lazily: the first call compiles; ``backend`` other than inductor is for tests);
    returns it. Its calls run under `dynamo_settings`; nothing process-wide changes."""
    if backend == "inductor":
        model.compile(backend=backend, mode=mode)
    else:
        model.compile(backend=backend)
    call = compiled_call(model)

    def call_with_settings(*args: Any, **kwargs: Any) -> Any:
        with dynamo_settings():
            return call(*args, **kwargs)

    set_compiled_call(model, call_with_settings)
    return model


def is_compiled(model: nn.Module) -> bool:
    return compiled_call(model) is not None


def uncompile(model: nn.Module) -> None:
    """Undo `compile_module`: calls go to the eager module again."""
    set_compiled_call(model, None)


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain (inductor wraps a compiler's failure in its own), as ``Type: first line``."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    line = next((text for text in str(error).splitlines() if text.strip()), "")
    return f"{type(error).__name__}: {line.strip()[:160]}".rstrip(": ")


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` uncompiled for the duration (a FLOP count, a one-image latency: no graph is compiled for them)."""
    compiled = compiled_call(model)
    set_compiled_call(model, None)
    try:
        yield model
    finally:
        set_compiled_call(model, compiled)


def run_or_fall_back(model: nn.Module, what: str, fn: Callable[[], T]) -> T:
    """``fn()``, which calls ``model``; if it fails while ``model`` is compiled, ``model`` is uncompiled and ``fn()``
    runs again eagerly: if that succeeds, the failure was the compiler's and one warning line says so; if it fails too,
    its error (the model's own) is raised. ``fn`` must be safe to repeat (it may have run partly)."""
    if not is_compiled(model):
        return fn()
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 — any failure of a compiled call is retried eagerly, then judged
        uncompile(model)
        result = fn()
        print(
            f"attnlab: warning: --compile: {what} could not be compiled ({_root_cause(error)}); running it eagerly",
            file=sys.stderr,
            flush=True,
        )
        return result


__all__ = [
    "MODE",
    "RECOMPILE_LIMIT",
    "compile_module",
    "dynamo_settings",
    "eager",
    "is_compiled",
    "run_or_fall_back",
    "uncompile",
]
