"""User-facing errors with the exit codes of docs/architecture.md.

0 done; 2 usage error (bad flags, unreadable or malformed input);
3 model not supported (every unsupported node listed at once);
4 a proof check failed.
"""

from __future__ import annotations

from dataclasses import dataclass


class CertlibError(Exception):
    exit_code = 1


class UsageError(CertlibError):
    """Bad flags or unreadable input (exit code 2)."""

    exit_code = 2


@dataclass
class Unsupported:
    name: str
    op_type: str
    opset: int
    why: str

    def __str__(self) -> str:
        return f"{self.name or '<unnamed>'} ({self.op_type}, opset {self.opset}): {self.why}"


class UnsupportedModelError(CertlibError):
    """The model contains nodes certlib cannot bound (exit code 3)."""

    exit_code = 3

    def __init__(self, items: list[Unsupported] | str):
        if isinstance(items, str):
            items = [Unsupported("", "-", 0, items)]
        self.items = list(items)
        lines = "\n".join(f"  - {it}" for it in self.items)
        super().__init__(f"model not supported: {len(self.items)} problem(s)\n{lines}")


class ProofCheckError(CertlibError):
    """An independent proof check failed (exit code 4)."""

    exit_code = 4
