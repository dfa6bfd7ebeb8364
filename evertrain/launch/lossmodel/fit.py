"""The least-squares fit of L = L0 + A * S1^-alpha - C * S2 to a run's observations, and predictions
with a 95% interval.

Train windows predict the mean of the law over their steps; val losses predict the law at their step
plus `delta`, the gap between the validation and the training loss (the same model, scored on other
windows). The two kinds of point are weighted by their own noise: a first fit with equal weights
gives each kind's residual scatter, a second fit weights every residual by 1/scatter (feasible
generalised least squares), so a few hundred noisy train windows do not drown the val losses.
From VAL_ONLY_POINTS val losses on, the train windows are left out (delta stays 0, L0 absorbs it): the
train curve's shape may differ from the val curve's (a growing gap), and the backtest measured the
forecasts better without it (docs/decisions.md).

The momentum lambda of the annealing area is chosen from the run's own curves: the fit is made at
each lambda of DECAYS and the one whose residuals are the most likely (the smallest
n_train * log(scatter_train) + n_val * log(scatter_val), the Gaussian profile likelihood) is kept.
Tissue et al.'s 0.999 is a memory of ~1000 steps, longer than a short run's cooldowns (or the whole
run): fixed there, it forecast the demo run's cooldowns 0.06 .. 0.08 nats too low (docs/decisions.md).

Uncertainty: cov = s^2 (J^T J)^-1 of the weighted residuals at the optimum (as scipy's curve_fit
does), s^2 = SSE/(n - p). A predicted final val loss has the 95% interval
t(n - p) * sqrt(g^T cov g + sigma_val^2), g = d(prediction)/d(parameters): the parameters' uncertainty
plus the val points' own scatter around the law, since an actual result scatters as they did.
The lambdas whose fits are about as likely as the best (within the 95% point of chi2(1) in twice the
log-likelihood) are kept as `plausible`: an interval (and the stop rule's band) is widened to hold
their intervals too, so where the curves do not pin lambda down, the forecast says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from evertrain.launch.lossmodel.areas import DECAY, Areas, at_decay
from evertrain.launch.lossmodel.observations import LossModelError, Observations

NAMES = ("L0", "A", "alpha", "C", "delta")
LOWER = np.array([0.0, 1e-9, 0.01, 0.0, -np.inf])
UPPER = np.array([np.inf, np.inf, 3.0, np.inf, np.inf])
ALPHA_STARTS = (0.2, 0.5, 1.0)  # the fit is non-convex in alpha: the best of a few starts
ANNEALING_SEEN = 1e-9  # a largest fitted S2 (peak-LR steps) below this: the curves hold no annealing
VAL_ONLY_POINTS = 10  # from this many val losses on, fit them alone (docs/decisions.md: the train curve's
# shape drifts from the val curve's, and biases the forecasts)
DECAYS = (DECAY, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5, 0.0)  # the lambdas tried; on a tie, the first
DECAY_SET = float(stats.chi2.ppf(0.95, 1))  # lambdas within this of the best in 2 * log-likelihood: plausible


@dataclass
class LossModelFit:
    params: np.ndarray  # L0, A, alpha, C, delta
    cov: np.ndarray  # of params, from the weighted Jacobian
    sigma_train: float  # scatter of train windows around the law (nats)
    sigma_val: float  # scatter of val losses around the law + delta (nats)
    points: int
    val_points: int
    warnings: list[str] = field(default_factory=list)
    train_curves: bool = True  # the train windows were fitted too (else val losses only, delta = 0)
    annealing_seen: bool = True  # some fitted point had S2 > 0; else C is unknown (pinned to 0)
    decay: float = DECAY  # lambda of the annealing area (the most likely of DECAYS)
    plausible: list[LossModelFit] = field(default_factory=list)  # the fits at the other plausible lambdas

    def __getitem__(self, name: str) -> float:
        return float(self.params[NAMES.index(name)])

    @property
    def dof(self) -> int:
        return max(self.points - len(NAMES) + (not self.train_curves), 1)

    @property
    def t95(self) -> float:
        return float(stats.t.ppf(0.975, self.dof))

    def stderr(self, name: str) -> float:
        i = NAMES.index(name)
        return float(math.sqrt(max(self.cov[i, i], 0.0)))

    def law(self, s1, s2) -> np.ndarray:
        """The train loss after a step with areas (s1, s2)."""
        l0, a, alpha, c, _ = self.params
        return l0 + a * np.power(s1, -alpha) - c * np.asarray(s2)

    def val_loss(self, at: Areas, step: int) -> tuple[float, float]:
        """(predicted val loss after `step` of a branch with areas `at` (its S2 at any lambda), 95%
        half-width: wide enough to hold the interval of every plausible lambda's fit too)."""
        value, half = self.val_loss_at_own_decay(at, step)
        return value, widened(value, half, [f.val_loss_at_own_decay(at, step) for f in self.plausible])

    def val_loss_at_own_decay(self, at: Areas, step: int) -> tuple[float, float]:
        at = at_decay(at, self.decay)
        s1, s2 = np.array([at.s1[step - 1]]), np.array([at.s2[step - 1]])
        g = gradient(self.params, s1, s2, val=np.ones(1))[0]
        value = float(self.law(s1, s2)[0] + self["delta"])
        return value, self.t95 * math.sqrt(max(g @ self.cov @ g, 0.0) + self.sigma_val**2)

    def difference(self, a: tuple[Areas, int], b: tuple[Areas, int]) -> tuple[float, float]:
        """(val loss at a - val loss at b, 95% half-width of that difference): the parameters'
        uncertainty only, correlated between the two (the val scatter and delta cancel), widened to
        hold every plausible lambda's band."""
        value, half = self.difference_at_own_decay(a, b)
        return value, widened(value, half, [f.difference_at_own_decay(a, b) for f in self.plausible])

    def difference_at_own_decay(self, a: tuple[Areas, int], b: tuple[Areas, int]) -> tuple[float, float]:
        a, b = (at_decay(a[0], self.decay), a[1]), (at_decay(b[0], self.decay), b[1])
        ga, gb = (
            gradient(self.params, np.array([x.s1[s - 1]]), np.array([x.s2[s - 1]]), np.ones(1))[0]
            for x, s in (a, b)
        )
        la, lb = (float(self.law(x.s1[s - 1], x.s2[s - 1])) for x, s in (a, b))
        g = ga - gb
        return la - lb, self.t95 * math.sqrt(max(g @ self.cov @ g, 0.0))

    def formula(self) -> str:
        if not self.train_curves:
            return (
                f"L_val = {self['L0']:.3f} + {self['A']:.3g} * S1^-{self['alpha']:.3f} - {self['C']:.3g} * S2 "
                f"(+- {self.stderr('L0'):.2g}, {self.stderr('A'):.2g}, {self.stderr('alpha'):.2g}, "
                f"{self.stderr('C'):.2g}; val losses only; lambda {self.decay:g})"
            )
        return (
            f"L = {self['L0']:.3f} + {self['A']:.3g} * S1^-{self['alpha']:.3f} - {self['C']:.3g} * S2 "
            f"(val +{self['delta']:.3f}; +- {self.stderr('L0'):.2g}, {self.stderr('A'):.2g}, "
            f"{self.stderr('alpha'):.2g}, {self.stderr('C'):.2g}, {self.stderr('delta'):.2g}; "
            f"lambda {self.decay:g})"
        )


def widened(value: float, half: float, others: list[tuple[float, float]]) -> float:
    """The half-width around `value` that holds its own interval and every other (value, half-width)."""
    low = min([value - half] + [v - h for v, h in others])
    high = max([value + half] + [v + h for v, h in others])
    return max(value - low, high - value)


def gradient(params: np.ndarray, s1: np.ndarray, s2: np.ndarray, val: np.ndarray) -> np.ndarray:
    """d(law + delta * val)/d(params) at each (s1, s2): shape [len(s1), 5]."""
    _, a, alpha, _, _ = params
    power = np.power(s1, -alpha)
    return np.stack(
        [
            np.ones_like(s1),
            power,
            -a * power * np.log(s1),
            -np.asarray(s2, dtype=np.float64),
            np.asarray(val, dtype=np.float64),
        ],
        axis=1,
    )


@dataclass
class Design:
    """Every observed point as the steps it averages: step k of the flattened arrays belongs to point
    `point[k]`; the point's prediction is the mean of the law over its steps (+ delta for a val loss)."""

    s1: np.ndarray
    s2: np.ndarray
    point: np.ndarray
    counts: np.ndarray
    y: np.ndarray
    is_val: np.ndarray
    offset: np.ndarray  # 1 where delta applies (a val loss beside train windows); all 0 without train windows


def design(obs: Observations, train_curves: bool = True) -> Design:
    s1, s2, point, y, is_val = [], [], [], [], []
    for branch in obs.branches:
        spans = [(a, b, loss, False) for a, b, loss in branch.train] * train_curves
        spans += [(s, s, loss, True) for s, loss in branch.val]
        for first, last, loss, val in spans:
            s1.append(branch.areas.s1[first - 1 : last])
            s2.append(branch.areas.s2[first - 1 : last])
            point.append(np.full(last - first + 1, len(y)))
            y.append(loss)
            is_val.append(val)
    if not y:
        raise LossModelError(f"{obs.run_dir}: no losses to fit")
    point = np.concatenate(point)
    is_val = np.array(is_val)
    return Design(
        np.concatenate(s1),
        np.concatenate(s2),
        point,
        np.bincount(point).astype(np.float64),
        np.array(y),
        is_val,
        is_val.astype(np.float64) if train_curves else np.zeros(len(y)),
    )


def predictions(params: np.ndarray, d: Design) -> tuple[np.ndarray, np.ndarray]:
    """(prediction of every point, its Jacobian [points, 5])."""
    l0, a, alpha, c, delta = params
    per_step = l0 + a * np.power(d.s1, -alpha) - c * d.s2
    grads = gradient(params, d.s1, d.s2, np.zeros_like(d.s1))
    mean = np.bincount(d.point, weights=per_step) / d.counts
    jac = np.stack(
        [np.bincount(d.point, weights=grads[:, j]) / d.counts for j in range(4)] + [d.offset], axis=1
    )
    return mean + delta * d.offset, jac


def solve(d: Design, weights: np.ndarray) -> optimize.OptimizeResult:
    def residuals(p):
        return (predictions(p, d)[0] - d.y) * weights

    def jacobian(p):
        return predictions(p, d)[1] * weights[:, None]

    floor = float(d.y[~d.is_val].min()) if (~d.is_val).any() else float(d.y.min())
    best = None
    for alpha in ALPHA_STARTS:
        start = np.array([max(floor * 0.5, 0.0), max(floor * 0.5, 1e-3), alpha, 0.0, 0.0])
        found = optimize.least_squares(
            residuals, start, jac=jacobian, bounds=(LOWER, UPPER), x_scale="jac", method="trf", max_nfev=2000
        )
        if best is None or found.cost < best.cost:
            best = found
    return best


def fit_loss_model(obs: Observations, train_curves: bool | None = None) -> LossModelFit:
    """The fit of the loss model to `obs` (module docstring) at the most likely lambda of DECAYS;
    needs 2 val losses. `train_curves`: fit the train windows too (None: only while the run has fewer
    than VAL_ONLY_POINTS val losses)."""
    fits = [fit_at(obs.with_decay(decay), train_curves) for decay in DECAYS]
    best, best_score = min(fits, key=lambda fit_score: fit_score[1])  # the first of equals
    best.plausible = [fit for fit, score in fits if fit is not best and 2 * (score - best_score) <= DECAY_SET]
    return best


def fit_at(obs: Observations, train_curves: bool | None) -> tuple[LossModelFit, float]:
    """The fit at the observations' own lambda, and its score: minus the Gaussian log-likelihood of
    its residuals up to a constant (each kind of point at its own scatter)."""
    d = design(obs)
    n_val = int(d.is_val.sum())
    if n_val < 2:
        raise LossModelError(
            f"{obs.run_dir}: {n_val} validation loss(es) to fit against; the model needs 2 "
            "(the run's periodic evals, eval.every_steps, or finished cooldowns)"
        )
    if train_curves is None:
        train_curves = n_val < VAL_ONLY_POINTS
    if not train_curves:
        d = design(obs, train_curves=False)
    if len(d.y) <= len(NAMES) + 1:
        raise LossModelError(
            f"{obs.run_dir}: {len(d.y)} logged losses for {len(NAMES)} parameters; train longer"
        )
    first = solve(d, np.ones(len(d.y)))
    sigma = scatter(first.fun, d.is_val)
    weights = np.where(d.is_val, 1.0 / sigma[1], 1.0 / sigma[0])
    found = solve(d, weights)
    raw = found.fun / weights
    sigma = scatter(raw, d.is_val)
    dof = max(len(d.y) - len(NAMES) + (not train_curves), 1)  # delta is no parameter without train windows
    s2 = float(np.sum(found.fun**2)) / dof
    cov = s2 * np.linalg.pinv(found.jac.T @ found.jac)
    warnings = []
    annealing_seen = bool(d.s2.max() > ANNEALING_SEEN)
    if not annealing_seen:
        # C multiplies S2 = 0 at every point: no data constrain it, and the solver leaves it anywhere
        # (a constant-LR run before its first cooldown once fitted C = 802 +- 0). Pin it to 0.
        found.x[NAMES.index("C")] = 0.0
        cov[NAMES.index("C"), :] = cov[:, NAMES.index("C")] = 0.0
        warnings.append(
            "no annealing in the curves yet (a constant LR and no finished cooldown): the gain of a "
            "cooldown is unknown until one finishes"
        )
    elif found.x[NAMES.index("C")] <= 1e-9:
        warnings.append(
            "C = 0 (no annealing benefit fitted): the curves hold no annealing yet; finish a cooldown"
        )
    if found.x[NAMES.index("alpha")] in (LOWER[2], UPPER[2]):
        warnings.append(f"alpha at the edge of [{LOWER[2]}, {UPPER[2]}]: the curve is not a power law here")
    fit = LossModelFit(
        found.x,
        cov,
        sigma[0] if train_curves else math.nan,
        sigma[1],
        len(d.y),
        n_val,
        warnings,
        train_curves=train_curves,
        annealing_seen=annealing_seen,
        decay=obs.decay,
    )
    n_train = len(d.y) - n_val
    return fit, n_train * math.log(sigma[0]) + n_val * math.log(sigma[1])


def scatter(residuals: np.ndarray, is_val: np.ndarray) -> tuple[float, float]:
    """RMS residual of the train windows and of the val losses (a floor keeps weights finite)."""

    def rms(x):
        return max(float(np.sqrt(np.mean(x**2))) if len(x) else 0.0, 1e-6)

    return rms(residuals[~is_val]), rms(residuals[is_val])
