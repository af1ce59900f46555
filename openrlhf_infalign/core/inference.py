"""Inference procedures: how the aligned policy is used once trained (InfAlign, section 2).

``standard`` draws one sample; ``bon:N`` (Best-of-N) keeps the best of N samples by the reward model; ``won:N``
(Worst-of-N) the worst of N, e.g. for jailbreak robustness. The win rate the theory and the evaluation report is
always the procedure's: best of N policy samples against best of N reference samples, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InferenceProcedure"]


@dataclass(frozen=True)
class InferenceProcedure:
    """How the policy is used at inference time: ``standard`` (one sample), ``bon:N`` (Best-of-N with the reward
    model), ``won:N`` (Worst-of-N: the worst of N samples, e.g. jailbreak robustness). standard means n = 1."""

    kind: str
    n: int = 1

    def __post_init__(self):
        if self.kind not in ("standard", "bon", "won"):
            raise ValueError(f"unknown inference procedure kind {self.kind!r}; use standard, bon:N or won:N")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"inference procedure needs N >= 1, got {self.n!r}")
        if self.kind == "standard" and self.n != 1:
            raise ValueError("standard inference has n = 1")

    @classmethod
    def parse(cls, spec: str) -> "InferenceProcedure":
        s = str(spec).strip().lower()
        if s in ("standard", "std"):
            return cls("standard", 1)
        kind, sep, n = s.partition(":")
        if kind not in ("bon", "won") or not sep:
            raise ValueError(f"bad inference procedure {spec!r}; use standard, bon:N or won:N (e.g. bon:4)")
        try:
            num = int(n)
        except ValueError:
            raise ValueError(f"bad inference procedure {spec!r}: N={n!r} is not an integer (e.g. bon:4)") from None
        if num < 1:
            raise ValueError(f"bad inference procedure {spec!r}: N must be >= 1")
        return cls(kind, num)

    @classmethod
    def coerce(cls, x) -> "InferenceProcedure":
        return x if isinstance(x, cls) else cls.parse(x)

    @property
    def spec(self) -> str:
        return "standard" if self.kind == "standard" else f"{self.kind}:{self.n}"

    def __str__(self) -> str:
        return self.spec

    @property
    def words(self) -> str:
        """The procedure in words: "Best-of-4", "Worst-of-4", "standard sampling"."""
        return {"bon": f"Best-of-{self.n}", "won": f"Worst-of-{self.n}"}.get(self.kind, "standard sampling")

    @property
    def win_rate_words(self) -> str:
        """What its win rate is the probability of."""
        if self.kind == "standard":
            return "P(a policy sample beats a reference sample)"
        which = "best" if self.kind == "bon" else "worst"
        return f"P({which} of {self.n} policy samples beats {which} of {self.n} reference samples)"
