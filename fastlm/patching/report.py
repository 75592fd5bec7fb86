"""What :func:`fastlm.patch` did to a model, printable."""
from __future__ import annotations

from dataclasses import dataclass, field

PATCHED = "patched"
NOT_APPLICABLE = "not applicable"   # by design (e.g. no unpadding for decoders): no warning
UNSUPPORTED = "left alone"          # fastlm cannot serve it: warned about


@dataclass
class PatchReport:
    """``entries``: ``(part, status, detail)`` rows; ``str(report)`` renders them as a table."""

    model: str
    family: str | None
    backend: str
    entries: list = field(default_factory=list)

    def add(self, part: str, status: str, detail: str) -> None:
        self.entries.append((part, status, detail))

    @property
    def patched(self) -> list[str]:
        return [part for part, status, _ in self.entries if status == PATCHED]

    @property
    def left_alone(self) -> list[tuple[str, str]]:
        return [(part, detail) for part, status, detail in self.entries if status != PATCHED]

    def __str__(self) -> str:
        head = f"fastlm.patch({self.model}): family {self.family or 'unknown'}, backend {self.backend}"
        width = max((len(p) for p, _, _ in self.entries), default=0)
        swidth = max((len(s) for _, s, _ in self.entries), default=0)
        rows = [f"  {p:<{width}}  {s:<{swidth}}  {d}" for p, s, d in self.entries]
        return "\n".join([head, *rows])
