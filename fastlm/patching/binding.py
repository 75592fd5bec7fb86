"""Per-instance method replacement that can be undone exactly, and survives copies.

A replacement is a module-level function ``function(module, *args, **kwargs)`` stored on
ONE module instance, in its ``__dict__``, wrapped in a :class:`Method`: the class, other
instances and transformers' module globals are never touched.  What was in the instance's
``__dict__`` before (usually nothing: the class method was in effect) is kept in
``module._fastlm_originals`` and put back by :func:`restore`; the replacement reaches it
with :func:`original`.  Nothing here is a parameter or buffer, so state dicts are unchanged.

Why not closures or ``types.MethodType`` over a closure: ``copy.deepcopy`` copies
functions by reference, so a copied model's forward would still close over the ORIGINAL
instance (its weights, its encoder) and silently return the original's outputs.  Here
every piece of per-instance state lives in the instance's ``__dict__`` (copied with the
instance, references between modules remapped by deepcopy's memo) and the functions are
module-level, so ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` give a patched
copy that computes with its own weights.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

ORIGINALS = "_fastlm_originals"


class _Absent:
    """Marker for "the instance had no such attribute": one object, kept by copy and pickle."""

    def __reduce__(self):
        return "ABSENT"  # pickle / deepcopy resolve it to this module's global, not a new object

    def __repr__(self):
        return "ABSENT"


ABSENT = _Absent()


class Method:
    """``module.<name>`` after :func:`bind`: calling it calls ``function(module, *args, **kwargs)``.

    ``__func__`` / ``__self__`` / ``__code__`` / ``__name__`` as on a bound method (accelerate
    re-binds ``forward.__func__``; ``torch.export`` reads ``forward.__code__``);
    ``inspect.signature`` gives the replaced method's signature, so callers that inspect it
    (``Trainer`` drops dataset columns the forward does not name; ``generate`` looks for
    ``logits_to_keep``) see the same one.
    """

    def __init__(self, function: Callable, module, name: str):
        self.__func__, self.__self__, self.name = function, module, name

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __code__(self):  # torch.export names its shape environment after forward's code object
        return self.__func__.__code__

    @property
    def __name__(self) -> str:
        return self.name

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(original(self.__self__, self.name))

    def __repr__(self):
        return f"<fastlm replacement of {type(self.__self__).__name__}.{self.name}: {self.__func__.__qualname__}>"


def bind(module, name: str, function: Callable) -> None:
    """Replace ``module.<name>`` on this instance by ``function(module, *args, **kwargs)``.

    ``function`` must be a module-level function (pickled by reference) that keeps no
    per-instance state outside ``module.__dict__``; it calls what it replaced through
    :func:`original`.
    """
    _save(module, name)
    object.__setattr__(module, name, Method(function, module, name))


def original(module, name: str) -> Callable:
    """What ``module.<name>`` was before :func:`bind`, bound to ``module``.

    The class's method comes back as ``functools.partial(function, module)``, not as a bound
    method: where ``torch.compile`` breaks a graph inside a replacement (FSDP2's hooks do), it
    rebuilds a bound method by attribute lookup on the instance, i.e. ``module.<name>``,
    which is the replacement itself (endless recursion); a partial keeps the function."""
    previous = module.__dict__[ORIGINALS][name]
    if previous is ABSENT:
        return functools.partial(getattr(type(module), name), module)
    return previous


def set_attr(module, name: str, value) -> None:
    """Set a plain (non-parameter) attribute on this instance, restored by :func:`restore`."""
    _save(module, name)
    object.__setattr__(module, name, value)


def _save(module, name: str) -> None:
    saved = module.__dict__.setdefault(ORIGINALS, {})
    if name not in saved:  # a second bind/set of the same name keeps the first original
        saved[name] = module.__dict__.get(name, ABSENT)


def is_bound(module) -> bool:
    return ORIGINALS in module.__dict__


def restore(module) -> None:
    """Undo every :func:`bind` / :func:`set_attr` on this instance."""
    saved = module.__dict__.pop(ORIGINALS, None)
    if not saved:
        return
    for name, previous in saved.items():
        if previous is ABSENT:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous


def signature(method: Callable) -> inspect.Signature:
    """``inspect.signature`` of a bound method, cached per underlying function (per-call cost)."""
    function = getattr(method, "__func__", None)
    if function is None or not inspect.isfunction(function):
        return inspect.signature(method)
    return _without_self(function)


@functools.lru_cache(maxsize=None)
def _without_self(function: Callable) -> inspect.Signature:
    sig = inspect.signature(function)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


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
