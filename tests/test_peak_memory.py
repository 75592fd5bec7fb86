"""The one peak-memory meter (``fastlm.finetune.memory.PeakMemory``) that ``fastlm finetune``
and every benchmark use: VmHWM growth on CPU, the CUDA allocator's peak on a GPU."""
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlm.finetune import memory

MiB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_cpu_peak_catches_a_short_peak_and_starts_again_at_each_block():
    """In a fresh process: a 64 MiB buffer that lived for microseconds and was freed before
    the block ended is seen whole (a sampling meter would miss it); a later empty block sees
    nothing of it, because the high-water mark is reset at each entry."""
    script = textwrap.dedent("""
        import torch
        from fastlm.finetune.memory import PeakMemory, _status
        with PeakMemory("cpu") as peak:
            x = torch.ones(16 * 2**20)          # 64 MiB, touched
            del x
        assert _status("VmRSS") - peak.start < 16 * 2**20, "the buffer was not freed"
        with PeakMemory("cpu") as quiet:
            pass
        print(peak.growth, quiet.growth)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown, quiet = map(int, out.stdout.split())
    assert 64 * MiB <= grown < 96 * MiB
    assert quiet < 16 * MiB


def test_a_refused_reset_raises_rather_than_reading_an_old_mark(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    with pytest.raises(OSError, match="cannot reset the resident high-water mark"):
        with memory.PeakMemory("cpu"):
            pass


def test_an_error_in_the_block_passes_through_unmeasured():
    with pytest.raises(ValueError, match="in the block"):
        with memory.PeakMemory("cpu") as peak:
            raise ValueError("in the block")
    assert peak.growth is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_the_allocator_peak_above_the_start():
    kept = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")   # allocated before: not counted
    with memory.PeakMemory("cuda") as peak:
        x = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
        del x
    assert peak.growth == 64 * MiB
    with memory.PeakMemory(torch.device("cuda")) as quiet:
        pass
    assert quiet.growth == 0
    del kept
