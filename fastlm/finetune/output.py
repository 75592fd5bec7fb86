"""The output folder of ``fastlm finetune``, written all at once.

The run writes into a temporary sibling folder (``.<name>.partial-*``) and renames it into
place at the very end, so an error or Ctrl-C leaves no partial output.  A previous
``fastlm finetune`` output there (it has a report file) is replaced; any other non-empty
folder is refused before anything runs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from fastlm.finetune.data import FinetuneError
from fastlm.finetune.report import REPORT_FILE


class OutputDir:
    """Stage everything in a temporary sibling folder, rename it into place at the end."""

    def __init__(self, path: str):
        self.path = Path(path).absolute()
        if self.path.exists() and not self.path.is_dir():
            raise FinetuneError(f"output dir {path} is a file")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / REPORT_FILE).is_file():
            raise FinetuneError(f"output dir {path} is not empty and is not a previous fastlm finetune "
                                f"output: choose another --output-dir")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir() or not os.access(parent, os.W_OK):
                    raise FinetuneError(f"cannot create output dir {path}: {parent} is not a writable folder")
                break

    @contextlib.contextmanager
    def staging(self):
        """A fresh staging folder, removed if the block raises (the output dir is untouched)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)   # mkdtemp makes it private; the output dir is an ordinary folder
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def commit(self, stage: Path) -> None:
        """Put ``stage`` in place of the output dir (the previous output is removed after)."""
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "previous")
        os.replace(stage, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
