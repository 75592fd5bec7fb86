"""What :func:`fastlm.patch` did to a model, printable, kept current while the model lives.

The report :func:`fastlm.patch` returns is also kept on the model (``model._fastlm_report``)
and updated when a patched part is handed back to transformers later
(``set_attn_implementation`` after patching, or a device where fastlm's fastest backend
is the reference: :mod:`fastlm.patching.tiers`), so ``print(report)`` stays true.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PATCHED = "patched"
NOT_APPLICABLE = "not applicable"   # by design (e.g. no unpadding for decoders): no warning
UNSUPPORTED = "left alone"          # fastlm cannot serve it: warned about
HANDED_BACK = "handed back"         # was patched; transformers' own path serves it now (detail says why)


@dataclass
class PatchReport:
    """``entries``: ``(part, status, detail)`` rows; ``str(report)`` renders them as a table.

    ``tiers``: per ``"device/dtype"`` the model ran on, what serves each fastlm op there
    (``{op: backend or "transformers"}``), filled at the first forward on each."""

    model: str
    family: str | None
    backend: str
    entries: list = field(default_factory=list)
    tiers: dict = field(default_factory=dict)
    _patched_detail: dict = field(default_factory=dict, repr=False)

    def add(self, part: str, status: str, detail: str) -> None:
        self.entries.append((part, status, detail))
        if status == PATCHED:
            self._patched_detail[part] = detail

    def hand_back(self, part: str, why: str | None) -> None:
        """Mark a patched ``part`` as served by transformers (``why``) or, with None, patched again."""
        if part not in self._patched_detail:
            return
        row = (part, PATCHED, self._patched_detail[part]) if why is None else (part, HANDED_BACK, why)
        self.entries = [row if p == part else (p, s, d) for p, s, d in self.entries]

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
        for where, ops in self.tiers.items():
            rows.append(f"  on {where}: " + ", ".join(f"{op} -> {who}" for op, who in ops.items()))
        return "\n".join([head, *rows])
