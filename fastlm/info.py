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
        rows = {}
        for name in registry.PRIORITY:
            impl = registry.table(op).get(name)
            if impl is None:
                continue
            rows[name] = {
                "dtypes": [str(d).replace("torch.", "") for d in impl.dtypes],
                "status": impl.status,
                "auto": registry.BACKENDS[name].unavailable_reason() is None
                and (not registry.BACKENDS[name].runs_on_gpu or impl.verified is not None),
            }
        data["ops"][op] = rows
    return data


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
    for op, rows in data["ops"].items():
        lines.append(f"  {op}")
        for name, r in rows.items():
            lines.append(f"    {name:<10} {'auto' if r['auto'] else 'explicit only':<14} {r['status']:<22} dtypes {', '.join(r['dtypes'])}")
    return "\n".join(lines)
