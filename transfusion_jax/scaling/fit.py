"""Power-law fits in log-log space and the parity FLOP ratio (paper section 4.2, Table 3).

    fit = fit_power_law(flops, values)        # log(value) = a + b log(C), least squares
    fit.predict(C); fit.flops_for(value); fit.interval("b")
    parity_ratio(transfusion_fit, chameleon_points)   # Table 3's parity FLOP ratio
    keep_point(metric, value)                 # the quality thresholds (footnote 16), as data

Confidence intervals come from the fit itself: ordinary least squares on (log C, log value),
residual variance s^2 = RSS / (n - 2), the usual covariance of (a, b), Student's t with n - 2
degrees of freedom. They exist with 3 or more points (with 2 the line passes through both and
there is no residual to estimate the noise from); with fewer than 2 points there is no fit.

The parity FLOP ratio, as Table 3: the metric value of Chameleon's largest run (most FLOPs;
its measured value), the FLOPs at which Transfusion's fitted line reaches that value, divided by
that run's FLOPs. Below 1: Transfusion needs less compute. Closed form: with Transfusion's fit
log m = a + b log C and Chameleon's largest run (C_c, m_c),
    ratio = exp((log m_c - a) / b) / C_c.
Its interval propagates the fit's covariance to log C* = (log m_c - a) / b (delta method;
d/da = -1/b, d/db = -log C*/b) with the same t quantile. A fit whose slope has the wrong sign
for the metric's direction (perplexity rising with compute) gives no ratio: the line never
reaches a better value by spending more.

Directions and thresholds are data (METRICS in experiments/scaling.py): "lower" (perplexity,
FID) or "higher" (accuracy, CIDEr, CLIP) is better; a threshold drops points on the wrong side
of it, inclusive, as footnote 16 words it (kept: FID < 100, CLIP > 17, CIDEr > 4, on the paper's
scales: CIDEr x 100, CLIP score x 100 of a cosine).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

DIRECTIONS = ("lower", "higher")
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric of a sweep: its key in evals/<step>.json ("<evaluator name>/<scalar>"), a label,
    which way is better, and the quality threshold (None: keep every point). A point is dropped
    when its value is at or beyond the threshold on the bad side: lower is better -> dropped if
    value >= threshold; higher is better -> dropped if value <= threshold."""
    key: str
    label: str
    direction: str  # "lower" or "higher" is better
    threshold: float | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.key}: direction={self.direction!r}; expected one of "
                             f"{DIRECTIONS}")

    @classmethod
    def from_dict(cls, d) -> Metric:
        d = dict(d)
        threshold = d.get("threshold")
        return cls(str(d["key"]), str(d.get("label") or d["key"]), str(d["direction"]),
                   None if threshold is None else float(threshold))


def keep_point(metric: Metric, value: float) -> tuple[bool, str]:
    """(kept, why not): the threshold of footnote 16, and values a log axis cannot hold."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False, "not a finite number"
    if value <= 0:
        return False, "not positive (log scale)"
    if metric.threshold is not None:
        if metric.direction == "lower" and value >= metric.threshold:
            return False, f">= {metric.threshold:g} (threshold)"
        if metric.direction == "higher" and value <= metric.threshold:
            return False, f"<= {metric.threshold:g} (threshold)"
    return True, ""


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student's t quantile for `df` degrees of freedom."""
    from scipy import stats
    return float(stats.t.ppf(0.5 + confidence / 2, df))


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """log(value) = a + b log(C): value = exp(a) * C^b. `cov` the covariance of (a, b) (None
    with 2 points), `df` = n - 2."""
    a: float
    b: float
    n: int
    cov: np.ndarray | None
    confidence: float = CONFIDENCE

    @property
    def df(self) -> int:
        return self.n - 2

    def predict(self, flops):
        return np.exp(self.a + self.b * np.log(np.asarray(flops, float)))

    def flops_for(self, value: float) -> float:
        """C at which the line reaches `value` (inf/0 when b == 0)."""
        if self.b == 0:
            return math.inf
        return math.exp((math.log(value) - self.a) / self.b)

    def stderr(self, name: str) -> float | None:
        if self.cov is None:
            return None
        i = {"a": 0, "b": 1}[name]
        return float(math.sqrt(max(self.cov[i, i], 0.0)))

    def interval(self, name: str) -> tuple[float, float] | None:
        """The `confidence` interval of a or b (None without 3 points)."""
        se = self.stderr(name)
        if se is None:
            return None
        value, t = getattr(self, name), t_quantile(self.df, self.confidence)
        return value - t * se, value + t * se


def fit_power_law(flops: Sequence[float], values: Sequence[float],
                  confidence: float = CONFIDENCE) -> PowerLaw:
    """Least squares of log(values) on log(flops). Needs 2+ points at 2+ distinct FLOPs."""
    x = np.log(np.asarray(flops, float))
    y = np.log(np.asarray(values, float))
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError(f"a power-law fit needs 2 or more points, got {n}")
    x_mean, y_mean = x.mean(), y.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    if sxx <= 0:
        raise ValueError("a power-law fit needs points at 2 or more distinct FLOPs")
    b = float(((x - x_mean) * (y - y_mean)).sum() / sxx)
    a = float(y_mean - b * x_mean)
    cov = None
    if n >= 3:
        s2 = float(((y - a - b * x) ** 2).sum()) / (n - 2)
        cov = s2 * np.array([[1.0 / n + x_mean ** 2 / sxx, -x_mean / sxx],
                             [-x_mean / sxx, 1.0 / sxx]])
    return PowerLaw(a, b, n, cov, confidence)


@dataclasses.dataclass(frozen=True)
class Parity:
    """Table 3's parity FLOP ratio of one metric; `note` says why there is none."""
    ratio: float | None
    interval: tuple[float, float] | None
    chameleon_flops: float | None
    chameleon_value: float | None
    transfusion_flops: float | None
    note: str = ""


def parity_ratio(transfusion: PowerLaw | None, chameleon_points: Sequence[tuple[float, float]],
                 direction: str) -> Parity:
    """The FLOPs Transfusion's fit needs to reach the value of Chameleon's largest run
    (`chameleon_points`: (FLOPs, value) pairs after the thresholds), over that run's FLOPs."""
    if not chameleon_points:
        return Parity(None, None, None, None, None, "no Chameleon point")
    c_flops, c_value = max(chameleon_points, key=lambda p: p[0])
    if transfusion is None:
        return Parity(None, None, c_flops, c_value, None, "no Transfusion fit")
    improving = transfusion.b < 0 if direction == "lower" else transfusion.b > 0
    if not improving:
        return Parity(None, None, c_flops, c_value, None, "Transfusion's fit does not improve "
                      f"with compute (slope {transfusion.b:.3g})")
    log_c = (math.log(c_value) - transfusion.a) / transfusion.b
    ratio = math.exp(log_c - math.log(c_flops))
    interval = None
    if transfusion.cov is not None:
        grad = np.array([-1.0 / transfusion.b, -log_c / transfusion.b])
        se = float(math.sqrt(max(grad @ transfusion.cov @ grad, 0.0)))
        t = t_quantile(transfusion.df, transfusion.confidence)
        interval = (math.exp(log_c - t * se - math.log(c_flops)),
                    math.exp(log_c + t * se - math.log(c_flops)))
    return Parity(ratio, interval, c_flops, c_value, math.exp(log_c))
