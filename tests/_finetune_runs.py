"""Shared by the ``fastlm finetune`` tests (not a test module)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def run_leaving_environ(argv: list[str], out: Path):
    """``fastlm.finetune.run(argv + --output-dir out)``, asserting it left ``os.environ`` as it was.

    The offline switches the run sets are removed first (CI exports them), so a run that
    leaked them would be seen."""
    from fastlm import finetune
    from fastlm.finetune.cli import OFFLINE_ENV

    with pytest.MonkeyPatch.context() as mp:
        for name in OFFLINE_ENV:
            mp.delenv(name, raising=False)
        environ = dict(os.environ)
        outcome = finetune.run([*argv, "--output-dir", str(out)])
        assert dict(os.environ) == environ, "finetune.run left the environment changed"
    return outcome
