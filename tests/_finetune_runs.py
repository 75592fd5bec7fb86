"""Shared by the ``fastlm finetune`` tests (not a test module)."""
from __future__ import annotations

import os
from pathlib import Path


def run_leaving_environ(argv: list[str], out: Path):
    """``fastlm.finetune.run(argv + --output-dir out)``, asserting it left ``os.environ`` as it was."""
    from fastlm import finetune

    environ = dict(os.environ)
    outcome = finetune.run([*argv, "--output-dir", str(out)])
    assert dict(os.environ) == environ, "finetune.run left the environment changed"
    return outcome
