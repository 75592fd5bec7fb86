"""``fastlm info``: versions, the device, and what each backend can do here."""
from __future__ import annotations

import importlib.metadata
import json
import platform


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``fastlm info`` reports, as plain data."""
    import torch

    from fastlm import _ext, registry

    cuda_ok = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda_ok else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    data = {
        "versions": {
            "fastlm": _version("fastlm"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "cuda (torch built with)": torch.version.cuda or "none (CPU-only torch)",
        },
        "device": device,
        "triton_interpreter": registry.triton_interpreted(),
        "extension": {
            "loaded": _ext.load() is not None,
            "with_cuda_kernels": _ext.with_cuda(),
            "error": _ext.unavailable_reason(),
        },
        "backends": {},
        "ops": {},
    }
    for name, backend in registry.BACKENDS.items():
        why = backend.unavailable_reason()
        devices = sorted(backend.devices()) or ["any"]
        data["backends"][name] = {"summary": backend.summary, "devices": devices,
                                  "available": why is None, "reason": why}
    for op in registry.ops():
        rows = registry.table(op)
        every = frozenset().union(*(impl.features for impl in rows.values()))  # the op's features
        data["ops"][op] = {name: _row(impl, every) for name, impl in
                           ((n, rows[n]) for n in registry.BACKENDS if n in rows)}
    data["composites"] = {op: {"via": via, "how": how} for op, (via, how) in registry.composites().items()}
    return data


def _limits_data(limits, every: frozenset) -> dict:
    """Declared limits (of a row or of one of its kernels), as plain data."""
    return {
        "dtypes": [str(d).replace("torch.", "") for d in limits.dtypes],
        "head_dims": None if limits.head_dims is None else str(limits.head_dims),
        "max_length": limits.max_length,
        "features": sorted(limits.features),
        "features_missing": sorted(every - limits.features),
    }


def _row(impl, every: frozenset) -> dict:
    """One implementation row's limits, status and auto eligibility, as plain data."""
    return {
        **_limits_data(impl, every),
        "kernels": {k.name: _limits_data(k, every) for k in impl.kernels},
        "status": impl.status,
        "auto": impl.untrusted_reason() is None,  # select()'s rule, on a device this backend runs on
    }


def _limits(r: dict) -> str:
    parts = [", ".join(r["dtypes"])]
    if r["head_dims"] is not None:
        parts.append(f"head_dim {r['head_dims']}")
    if r["max_length"] is not None:
        parts.append(f"length <= {r['max_length']}")
    if r["features_missing"]:
        parts.append("all features but " + ", ".join(r["features_missing"]))
    elif r["features"]:
        parts.append("all features")
    return "; ".join(parts)


def info(as_json: bool = False) -> str:
    """A readable (or JSON) report of versions, device, backends and per-op kernels."""
    data = collect()
    if as_json:
        return json.dumps(data, indent=2)
    lines = ["fastlm " + data["versions"]["fastlm"], ""]
    lines += [f"  {k:<24} {v}" for k, v in data["versions"].items() if k != "fastlm"]
    lines += [f"  {'device':<24} {data['device']}"]
    if data["triton_interpreter"]:
        lines += [f"  {'triton':<24} TRITON_INTERPRET=1: Triton kernels run interpreted on CPU (tests only)"]
    lines += ["", "backends (auto tries them in this order):"]
    for name, b in data["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {name:<10} {b['summary']}; devices {', '.join(b['devices'])}; {state}")
    lines += ["", "kernels per op (auto = may be auto-selected on a device it runs on):"]
    width = max(len(r["status"]) for rows in data["ops"].values() for r in rows.values())
    for op, rows in data["ops"].items():
        features = sorted(set().union(*(r["features"] for r in rows.values())))
        lines.append(f"  {op} (features: {', '.join(features) or 'none'})")
        for name, r in rows.items():
            lines.append(f"    {name:<10} {'auto' if r['auto'] else 'explicit only':<14} {r['status']:<{width}} "
                         f"{_limits(r)}")
            for kernel, k in r["kernels"].items():  # a backend with several kernels: each one's limits
                lines.append(f"    {'':<25} {'- ' + kernel:<{width}} {_limits(k)}")
    for op, c in data["composites"].items():
        lines.append(f"  {op}: via {c['via']} ({c['how']}): every {c['via']} backend above")
    return "\n".join(lines)
