"""The Triton kernels as a GPU compiler sees them: every launch a set of representative op
calls makes under the interpreter, compiled for sm_90 (the H200) without a GPU, and the
autotune pruners' shared-memory estimates checked against what the compiler allocates.

``TRITON_INTERPRET=1`` runs the kernels' Python semantics on NumPy; it does not type-check
them the way the compiler does (integer widths in loop bounds, constexpr use, layouts,
shared memory), so a kernel can pass every CPU test and still fail to build on a GPU.
Here the launches are recorded (kernel, argument types, constexprs, num_warps) and a
subprocess with the interpreter off compiles each distinct one to a cubin with
``triton.compile`` (the ptxas that ships with triton; no driver, no GPU).  Compiled is not
verified: the kernels stay "compiled, unverified" until they have run on a GPU.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow


def _launches(monkeypatch):
    """Run the representative calls under the interpreter; returns the distinct launches."""
    from triton.runtime import interpreter

    import fastlm
    from fastlm.ops import (attention, cross_entropy, disentangled_attention, linear_cross_entropy, softmax,
                            varlen_attention, varlen_disentangled_attention)

    if not fastlm.registry.triton_interpreted():
        pytest.skip("records launches under TRITON_INTERPRET=1")
    records = {}
    real_run = interpreter.InterpretedFunction.run

    def record(self, *args, **kwargs):
        records.setdefault(_describe(self.fn, args, kwargs), None)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    t = lambda *shape, dtype=torch.float16: torch.randn(*shape).to(dtype).requires_grad_()  # noqa: E731
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v = t(2, 4, 9, 64, dtype=dtype), t(2, 2, 9, 64, dtype=dtype), t(2, 2, 9, 64, dtype=dtype)
        mask = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
        for kw in (dict(), dict(key_padding_mask=mask, causal=True), dict(causal="bottom_right", window=3),
                   dict(key_padding_mask=mask, dropout_p=0.2, window=4)):
            attention(q, k, v, backend="triton", **kw).sum().backward()
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    qp, kp, vp = t(13, 4, 40), t(13, 4, 40), t(13, 4, 40)
    varlen_attention(qp, kp, vp, cu, cu, 7, 7, causal=True, window=3, backend="triton").sum().backward()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v, pk, pq = (t(*shape, dtype=dtype) for shape in ((2, 2, 9, 64),) * 3 + ((2, 8, 64),) * 2)
        for kw in (dict(), dict(key_padding_mask=mask, dropout_p=0.2)):
            disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16, backend="triton",
                                   **kw).sum().backward()
    varlen_disentangled_attention(qp, kp, vp, t(4, 8, 40), None, cu, 7, position_buckets=4, max_relative_positions=16,
                                  backend="triton").sum().backward()
    for dtype in (torch.float16, torch.bfloat16):
        x = t(2, 3, 300, dtype=dtype)
        for kw in (dict(), dict(mask=torch.rand(2, 1, 300) > 0.2, dropout_p=0.1), dict(mask=t(3, 300, dtype=dtype))):
            softmax(x, scale=0.5, backend="triton", **kw).sum().backward()
    import fastlm.kernels.softmax as softmax_kernels

    monkeypatch.setattr(softmax_kernels, "MAX_ROW_BLOCK", 16)  # the long-row (segmented) kernels
    monkeypatch.setattr(softmax_kernels, "ONLINE_BLOCK", 16)
    softmax(t(2, 41), mask=torch.rand(2, 41) > 0.2, dropout_p=0.1, backend="triton").sum().backward()
    labels = torch.tensor([1, -100, 3, 4])
    for dtype in (torch.float32, torch.bfloat16):
        cross_entropy(t(4, 97, dtype=dtype), labels, label_smoothing=0.1, backend="triton").backward()
        linear_cross_entropy(t(4, 16, dtype=dtype), t(97, 16, dtype=dtype), labels, bias=t(97, dtype=dtype),
                             backend="triton").backward()
    return list(records)


_POINTER = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.bool: "i1",
            torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def _describe(fn, args, kwargs) -> str:
    """One launch as JSON: kernel module and name, argument types, constexpr values, options."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs = {}, {}
    for p in params:
        value = values.get(p.name, p.default)
        if "constexpr" in str(p.annotation) or value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no Triton type for argument {p.name}={value!r}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if kwargs.get(k) is not None}
    return json.dumps({"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                       "constexprs": constexprs, "options": options}, sort_keys=True)


COMPILE = textwrap.dedent("""
    import json, sys, importlib
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "u8": torch.uint8,
              "i32": torch.int32, "i64": torch.int64, "i1": torch.bool, "i8": torch.int8}
    failures, count, seen = [], 0, set()
    for line in sys.stdin:
        launch = json.loads(line)
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        # Autotuned kernels: the interpreter ran one tiny config; a GPU runs these.  Every
        # launch gets the first GPU config, each kernel's first launch all of them and the
        # num_stages=1 copies (the pruner's fallback) of the first and the smallest.  A pruner's
        # shared-memory estimate must bound what the compiler allocates, or pruning could keep
        # a config the GPU refuses.
        configs, estimate = [None], None
        while not isinstance(fn, triton.runtime.JITFunction):  # autotuner / heuristics wrappers
            configs = getattr(fn, "configs", None) or configs
            estimate = getattr(getattr(fn, "early_config_prune", None), "shared_bytes", None) or estimate
            fn = fn.fn
        if configs[0] is not None and launch["kernel"] in seen:
            configs = configs[:1]
        elif configs[0] is not None:
            configs = configs + [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1)
                                 for c in (configs[0], configs[-1])]
        seen.add(launch["kernel"])
        if launch["constexprs"].get("DOT_PRECISION") == "widen":  # the interpreter-only bf16 products of
            launch["constexprs"]["DOT_PRECISION"] = "tf32"       # kernels/_flash.py's mma: a GPU runs "tf32"
        pointers = {name: torch.empty(0, dtype=DTYPES[t[1:]]) for name, t in launch["signature"].items()
                    if t.startswith("*")}
        for config in configs:
            constexprs, options = dict(launch["constexprs"]), dict(launch["options"])
            if config is not None:
                constexprs.update(config.kwargs)
                options.update(num_warps=config.num_warps, num_stages=config.num_stages)
            source = ASTSource(fn, launch["signature"], constexprs=constexprs)
            count += 1
            what = f"{launch['kernel']} {constexprs} {options}"
            try:
                kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            except Exception as exc:  # report every failing launch, not only the first
                failures.append(f"{what}: {type(exc).__name__}: {exc}")
                continue
            if estimate is not None and estimate(config, pointers, constexprs) < kernel.metadata.shared:
                failures.append(f"{what}: shared memory estimate {estimate(config, pointers, constexprs)} "
                                f"< {kernel.metadata.shared} compiled")
    print(json.dumps({"compiled": count, "failures": failures}))
""")


def test_every_recorded_triton_launch_compiles_for_sm90(monkeypatch, tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in this triton install ({ptxas})")
    launches = _launches(monkeypatch)
    kernels = {json.loads(launch)["kernel"] for launch in launches}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_fwd_rows", "_fwd_segment_stats",
            "_bwd_segment_write", "_dis_fwd", "_dis_bwd_dkdv", "_dis_bwd_dq"} <= kernels, kernels
    env = dict(os.environ, TRITON_INTERPRET="0")
    # cwd elsewhere: `python -c` puts the cwd first on sys.path, and in a checkout that is the source
    # folder, not the installed fastlm the launches were recorded from
    done = subprocess.run([sys.executable, "-c", COMPILE], input="\n".join(launches), capture_output=True,
                          text=True, env=env, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["compiled"] >= len(launches)
