"""Reward transforms Phi applied to the calibrated reward u in [0, 1] (InfAlign's "transform" step of CTRL).

Every transform ships in a NORMALISED form mapping [0, 1] onto [0, 1], monotone non-decreasing:

    identity        u
    exp:t=T         (e^{Tu} - 1) / (e^T - 1)                       Best-of-N family (T > 0)
    negexp:t=T      (1 - e^{-Tu}) / (1 - e^{-T})  (normalised -e^{-Tu})   Worst-of-N family (T > 0)
    log[:eps=E]     1 + log(max(u, E)) / |log E|, E = 1e-6 by default     BoN-distillation family
    power:k=K       u^K                                             (K > 0)
    optimal         the exact fixed-point optimum for an inference procedure and KL budget, tabulated on a grid
                    and linearly interpolated (built by ``theory.optimal_transform``; see
                    ``planning.resolve_transform``, which also resolves ``auto``)

Why normalised: scaling Phi by c is the same as dividing the KL coefficient beta by c, so the shape is all that
matters, and a reward in [0, 1] stays far inside OpenRLHF's ``--reward.clip_range``. Every beta this package
reports is for the normalised transform, i.e. it is the ``--algo.kl.init_coef`` to train with on reward Phi(u).
``Transform.scale`` (``normalised = scale * raw + offset``) converts to the paper's unnormalised beta:
``beta_raw = beta / scale`` (``Transform.raw_beta``).

``log`` needs one extra convention: log u is -inf at u = 0, and a calibrated reward of exactly 0 is common (a sample
below all K reference samples). Training therefore uses the clipped ``__call__`` above (u <= eps maps to 0), while
the theory integrates ``Transform.phi``, the exact ``1 + log(u)/|log eps|`` (-inf at 0, i.e. density 0 there). They
differ only on u < eps, which carries less than eps of probability under any of the optima, and it keeps the
closed-form check exact: Phi = log u with raw beta 1/(N-1) is the Best-of-N policy itself.

All forms are evaluated in log-space / with expm1 so that T up to thousands neither overflows nor warns.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["Transform", "parse_transform", "split_spec", "tabulated_transform", "TRANSFORM_NAMES"]

TRANSFORM_NAMES = ("identity", "exp", "negexp", "log", "power", "optimal", "auto")
LOG_EPS = 1e-6


def _fmt(x: float) -> str:
    """Canonical short number for specs: 10 -> '10', 6.8312 -> '6.831'."""
    return f"{float(x):.4g}"


class Transform:
    """A monotone map [0, 1] -> [0, 1] applied to calibrated rewards; callable on float64 arrays (vectorised).

    Attributes: ``name`` (family), ``params`` (dict), ``spec`` (canonical string, parses back to the same
    transform except ``optimal``, whose table comes from ``planning.resolve_transform``), ``scale`` (normalised =
    scale * raw + offset, for converting beta to the paper's unnormalised convention).
    """

    def __init__(
        self,
        name: str,
        params: dict,
        spec: str,
        fn: Callable[[np.ndarray], np.ndarray],
        phi: Callable[[np.ndarray], np.ndarray] | None = None,
        scale: float = 1.0,
    ):
        self.name = name
        self.params = dict(params)
        self.spec = spec
        self._fn = fn
        self._phi = phi or fn
        self.scale = float(scale)

    def __call__(self, u) -> np.ndarray:
        """Training reward Phi(u) in [0, 1] for calibrated rewards u (clipped into [0, 1] first)."""
        u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
        return np.clip(self._fn(u), 0.0, 1.0)

    def phi(self, u) -> np.ndarray:
        """Exact normalised Phi used by the theory (same as __call__ except ``log``, which is -inf at u = 0)."""
        return self._phi(np.asarray(u, dtype=np.float64))

    def raw_beta(self, beta: float) -> float:
        """The paper's beta for the unnormalised transform (exp(t u), -exp(-t u), log u, ...)."""
        return beta / self.scale if self.scale > 0 else math.inf

    def __repr__(self) -> str:
        return f"Transform({self.spec!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Transform) and other.spec == self.spec and other.name != "optimal"

    def __hash__(self) -> int:
        return hash(self.spec)


def _identity() -> Transform:
    return Transform("identity", {}, "identity", lambda u: u.copy())


def _exp(t: float) -> Transform:
    # (e^{tu}-1)/(e^t-1) = e^{t(u-1)} * (1-e^{-tu})/(1-e^{-t}): no overflow for any t > 0.
    den = -math.expm1(-t)

    def fn(u):
        return np.exp(t * (u - 1.0)) * (-np.expm1(-t * u)) / den

    scale = math.exp(-t) / den if t < 700 else 0.0  # 1/(e^t - 1)
    return Transform("exp", {"t": t}, f"exp:t={_fmt(t)}", fn, scale=scale)


def _negexp(t: float) -> Transform:
    den = -math.expm1(-t)

    def fn(u):
        return -np.expm1(-t * u) / den

    return Transform("negexp", {"t": t}, f"negexp:t={_fmt(t)}", fn, scale=1.0 / den)


def _log(eps: float) -> Transform:
    L = -math.log(eps)

    def fn(u):
        return 1.0 + np.log(np.maximum(u, eps)) / L

    def phi(u):
        with np.errstate(divide="ignore"):
            return 1.0 + np.log(u) / L

    spec = "log" if eps == LOG_EPS else f"log:eps={_fmt(eps)}"
    return Transform("log", {"eps": eps}, spec, fn, phi=phi, scale=1.0 / L)


def _power(k: float) -> Transform:
    return Transform("power", {"k": k}, f"power:k={_fmt(k)}", lambda u: np.power(u, k))


def tabulated_transform(u: np.ndarray, values: np.ndarray, name: str = "optimal", spec: str = "optimal", **params):
    """A transform given by values on an ascending grid u (linear interpolation), rescaled onto [0, 1]."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if u.ndim != 1 or u.shape != v.shape or len(u) < 2 or np.any(np.diff(u) <= 0):
        raise ValueError("tabulated transform needs matching 1-D arrays on a strictly ascending grid")
    v = np.maximum.accumulate(v)  # guard monotonicity against round-off
    lo, hi = v[0], v[-1]
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    v = (v - lo) * scale
    table_u, table_v = u.copy(), v

    def fn(x):
        return np.interp(x, table_u, table_v)

    t = Transform(name, params, spec, fn, scale=scale)
    t.table = (table_u, table_v)
    return t


def _number(name: str, key: str, raw: str, spec: str) -> float:
    try:
        x = float(raw)
    except ValueError:
        raise ValueError(f"transform {spec!r}: {key}={raw!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"transform {spec!r}: {key} must be a positive finite number (got {raw})")
    return x


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'exp:t=10' -> ('exp', {'t': '10'}): the family name (lower case) and its raw key=value parameters."""
    s = spec.strip()
    name, _, rest = s.partition(":")
    name = name.strip().lower()
    args: dict[str, str] = {}
    if rest.strip():
        for part in rest.split(","):
            key, eq, val = part.partition("=")
            if not eq or not key.strip() or not val.strip():
                raise ValueError(f"transform {spec!r}: expected key=value after ':' (e.g. exp:t=10), got {part!r}")
            args[key.strip().lower()] = val.strip()
    return name, args


_FAMILIES = {
    # name -> (required key, builder, example)
    "exp": ("t", _exp, "exp:t=10"),
    "negexp": ("t", _negexp, "negexp:t=10"),
    "power": ("k", _power, "power:k=2"),
}


def parse_transform(spec: str) -> Transform:
    """Parse identity | exp:t=T | negexp:t=T | log[:eps=E] | power:k=K (``optimal``, ``auto``: ``planning.py``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty transform spec; use one of identity, exp:t=T, negexp:t=T, log, power:k=K")
    name, args = split_spec(spec)
    if name in ("optimal", "auto"):
        raise ValueError(
            f"transform {spec!r} depends on the inference procedure and KL budget; use resolve_transform(...)"
        )
    if name == "identity":
        if args:
            raise ValueError(f"transform {spec!r}: identity takes no parameters")
        return _identity()
    if name == "log":
        unknown = set(args) - {"eps"}
        if unknown:
            raise ValueError(f"transform {spec!r}: unknown parameter {sorted(unknown)[0]!r} (log takes eps)")
        eps = _number(name, "eps", args["eps"], spec) if "eps" in args else LOG_EPS
        if eps >= 1:
            raise ValueError(f"transform {spec!r}: eps must be in (0, 1)")
        return _log(eps)
    if name in _FAMILIES:
        key, build, example = _FAMILIES[name]
        unknown = set(args) - {key}
        if unknown:
            raise ValueError(f"transform {spec!r}: unknown parameter {sorted(unknown)[0]!r} ({name} takes {key})")
        if key not in args:
            raise ValueError(f"transform {spec!r}: missing {key}=..., e.g. {example}")
        return build(_number(name, key, args[key], spec))
    raise ValueError(
        f"unknown transform {name!r} in {spec!r}; choose identity, exp:t=T, negexp:t=T, log, power:k=K, optimal, auto"
    )
