"""Lazy ``triton.jit`` of kernels that call shared device functions.

``triton.jit`` decides when it runs whether a function compiles or is interpreted
(``TRITON_INTERPRET=1``), so the kernel modules jit on first use and cache per mode. A kernel that
calls a helper must see, under the helper's name, a jitted helper of its own mode: ``jit_kernels``
jits the helpers (callees first) and gives each kernel and helper a copy of its globals in which
those names are the jitted ones.
"""

from __future__ import annotations

import triton


def rebound(fn, g: dict):
    """A copy of ``fn`` whose globals are ``g``. The annotations must come along: the compiling
    JIT reads ``tl.constexpr`` from them (without, constexpr arguments become runtime arguments and
    a str cannot be bound), while the interpreter ignores them, which is why only a GPU showed it."""
    new = type(fn)(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__annotations__ = dict(fn.__annotations__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return new


def jit_kernels(kernels, helpers=()) -> tuple:
    """``kernels`` jitted, each calling jitted ``helpers`` (plain functions, listed callees
    first: a helper may call the ones before it). Returns the jitted kernels, in order."""
    jitted: dict = {}
    for fn in helpers:
        jitted[fn.__name__] = triton.jit(rebound(fn, dict(fn.__globals__, **jitted)))
    return tuple(triton.jit(rebound(fn, dict(fn.__globals__, **jitted))) for fn in kernels)


__all__ = ["jit_kernels", "rebound"]
