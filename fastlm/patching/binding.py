"""Per-instance method replacement that can be undone exactly.

A replacement is a plain function bound to ONE module instance with
``types.MethodType`` and stored in that instance's ``__dict__``: the class, other
instances and transformers' module globals are never touched.  What was in the
instance's ``__dict__`` before (usually nothing: the class method was in effect) is kept
in ``module._fastlm_originals`` and put back by :func:`restore`.  Nothing here is a
parameter or buffer, so state dicts are unchanged.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable

ORIGINALS = "_fastlm_originals"
_ABSENT = object()


def bind(module, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``module.<name>`` on this instance by ``make(original)`` (an unbound function of self).

    The replacement carries the original's signature, so callers that inspect it
    (``Trainer`` drops dataset columns the forward does not name) see the same one.
    """
    original = getattr(module, name)
    fn = make(original)
    try:
        sig = inspect.signature(original)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    except (TypeError, ValueError):  # builtins without a signature: leave fn's own
        pass
    fn.__doc__ = getattr(original, "__doc__", None)
    saved = module.__dict__.setdefault(ORIGINALS, {})
    if name not in saved:  # a second bind of the same name keeps the first original
        saved[name] = module.__dict__.get(name, _ABSENT)
    object.__setattr__(module, name, types.MethodType(fn, module))


def set_attr(module, name: str, value) -> None:
    """Set a plain (non-parameter) attribute on this instance, restored by :func:`restore`."""
    saved = module.__dict__.setdefault(ORIGINALS, {})
    if name not in saved:
        saved[name] = module.__dict__.get(name, _ABSENT)
    object.__setattr__(module, name, value)


def is_bound(module) -> bool:
    return ORIGINALS in module.__dict__


def restore(module) -> None:
    """Undo every :func:`bind` / :func:`set_attr` on this instance."""
    saved = module.__dict__.pop(ORIGINALS, None)
    if not saved:
        return
    for name, previous in saved.items():
        if previous is _ABSENT:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous


def split_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Name every argument of a forward call (positional ones included), flattening ``**kwargs``."""
    bound = signature.bind(*args, **kwargs)
    named = {}
    for pname, value in bound.arguments.items():
        if signature.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[pname].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"unexpected extra positional arguments {value!r}")
        else:
            named[pname] = value
    return named
