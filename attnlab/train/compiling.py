"""``--compile``: a model compiled in place with torch.compile (inductor), and the fall-back to eager where it cannot.

The model is compiled in place (`nn.Module.compile`), not wrapped: the module, its submodules' names and its
``state_dict`` keys stay what they are, so checkpoints, weights and analyses see the model they always saw; only its
calls go through the compiled graph. Where the model or the backend cannot compile (no C++ compiler for inductor's CPU
kernels, an op inductor refuses, a double backward through a compiled graph, ...), `run_or_fall_back` retries eagerly
and prints one warning line: the work gets done either way.

Mode ``default``, chosen by measuring (`benchmarks/compile_modes.py --threads 1 --repeats 15` →
``results/compile_modes.csv``: resnet20, batch 128 of 1×28×28, bf16, median process-CPU time per train step over 15
round-robin repeats on the shared 2-core CPU at load ≈ 11): eager 185 ms, ``default`` 161 ms (0.87×),
``max-autotune-no-cudagraphs`` 160 ms (0.87×), ``reduce-overhead`` 159 ms (0.86×) — the three modes are equal within
the noise, so the cheapest to compile wins: on a cold cache max-autotune took 139 s of wall time to ``default``'s
102 s (noisy: the machine was shared). ``reduce-overhead`` adds CUDA graphs, nothing on CPU; on CUDA they would hold
memory for every batch shape a run sees (training, evaluation, the last partial batch), so ``default`` there too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

MODE = "default"
T = TypeVar("T")


RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per code object. It counts them across every instance of a class, so a process that compiles
many differently built models of one class (compare over many entries, bench, analyze over several runs) would pass
torch's default of 8 and silently run the later models eagerly."""


def compile_module(model: nn.Module, *, mode: str = MODE, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place (lazily: the first call compiles; ``backend`` other than inductor is for tests);
    returns it."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # by default dynamo does not guard on module hooks: a hook added after the first compiled call (capture_attention,
    # CRAM's rectangles for its equivariance term) is then never called; guarding recompiles once instead
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    if backend == "inductor":
        model.compile(backend=backend, mode=mode)
    else:
        model.compile(backend=backend)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def uncompile(model: nn.Module) -> None:
    """Undo `compile_module`: calls go to the eager module again."""
    model._compiled_call_impl = None


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain (inductor wraps a compiler's failure in its own), as ``Type: first line``."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    line = next((text for text in str(error).splitlines() if text.strip()), "")
    return f"{type(error).__name__}: {line.strip()[:160]}".rstrip(": ")


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` uncompiled for the duration (a FLOP count, a one-image latency: no graph is compiled for them)."""
    compiled = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        yield model
    finally:
        model._compiled_call_impl = compiled


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


__all__ = ["MODE", "RECOMPILE_LIMIT", "compile_module", "eager", "is_compiled", "run_or_fall_back", "uncompile"]
