"""The scaling-law fit behind `evertrain report`, its uncertainty, and the one projection it makes.

L(D) = E + B * D^-beta, D = tokens trained by the end of a cooldown, fitted by least squares to the
(tokens, val loss) results of one cooldown shape. The uncertainty is the usual nonlinear least-squares
one (what scipy's curve_fit returns): cov = s^2 (J^T J)^-1 over the free parameters, s^2 = SSE/(n-p),
and the band at D is t * sqrt(g^T cov g) with g = dL/dparams and t the two-sided 95% Student-t quantile
for n-p degrees of freedom. A fit is degenerate, and says so, when it has no more points than free
parameters (it interpolates: no band), or when a parameter sits on its bound (E = 0, or beta at the
edge of its search range): the band then assumes that parameter is exact.

`project` is the only place a projected loss is computed: the console line and the plot both show
the Projection it returns, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

MIN_FIT_POINTS = 3
BETA_RANGE = (0.02, 3.0)  # beta's bounds; a fit on either is at its bound
BETA_STARTS = (0.05, 0.2, 0.5, 1.0, 2.0)  # the fit is non-convex in beta: the best of several starts


def t95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with `dof` degrees of freedom."""
    return float(stats.t.ppf(0.975, dof))


@dataclass
class PowerLawFit:
    """L(D) = E + B * D^-beta, with the covariance of its free parameters (internally D is scaled by
    `scale`, the largest D fitted, so D^-beta stays well conditioned: L = E + b * (D/scale)^-beta)."""

    E: float
    B: float
    beta: float
    rmse: float
    points: int
    shape: str
    scale: float = 1.0
    free: tuple[str, ...] = ("E", "b", "beta")  # the parameters the covariance is over
    cov: np.ndarray | None = None  # None: no more points than free parameters, the band is unknown
    warnings: list[str] = field(default_factory=list)

    @property
    def degenerate(self) -> bool:
        return bool(self.warnings)

    @property
    def dof(self) -> int:
        return self.points - len(self.free)

    def __call__(self, tokens):
        return self.E + self.B * np.power(np.asarray(tokens, dtype=np.float64), -self.beta)

    def gradient(self, tokens) -> np.ndarray:
        """dL/d(free parameters) at each D: shape [len(D), len(free)]."""
        s = np.atleast_1d(np.asarray(tokens, dtype=np.float64)) / self.scale
        b = self.B * self.scale**-self.beta
        columns = {
            "E": np.ones_like(s),
            "b": np.power(s, -self.beta),
            "beta": -b * np.power(s, -self.beta) * np.log(s),
        }
        return np.stack([columns[name] for name in self.free], axis=1)

    def band(self, tokens) -> np.ndarray:
        """Half-width of the 95% confidence band of L at each D; NaN where it is unknown."""
        g = self.gradient(tokens)
        if self.cov is None:
            return np.full(len(g), math.nan)
        return t95(self.dof) * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", g, self.cov, g), 0.0))

    def param_stderr(self, name: str) -> float:
        """Standard error of E, beta or b (the scaled B); NaN when unknown, 0 for a parameter on its bound."""
        if name not in self.free:
            return 0.0
        if self.cov is None:
            return math.nan
        i = self.free.index(name)
        return float(math.sqrt(max(self.cov[i, i], 0.0)))

    def formula(self) -> str:
        def pm(name: str) -> str:
            err = self.param_stderr(name)
            return "" if err == 0.0 else (" +- ?" if math.isnan(err) else f" +- {err:.2g}")

        return f"L(D) = {self.E:.4f}{pm('E')} + {self.B:.4g} * D^-({self.beta:.3f}{pm('beta')})"


def fit_power_law(tokens, losses, shape: str = "", beta_range=BETA_RANGE) -> PowerLawFit | None:
    """Least squares fit of L(D) = E + B * D^-beta with E >= 0, B > 0, beta in `beta_range`, and its
    covariance. scipy's bounded least squares (trust region reflective) from several starting betas,
    each starting (E, b) the exact linear solve at that beta; the best wins. None when the points admit
    no decreasing curve (B ends on its bound 0)."""
    d = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(d) < MIN_FIT_POINTS or len(set(d.tolist())) < MIN_FIT_POINTS or not np.all(d > 0):
        return None
    scale = float(d.max())
    scaled = d / scale

    def residuals(p):
        e, b, beta = p
        return e + b * np.power(scaled, -beta) - y

    def jacobian(p):
        _, b, beta = p
        x = np.power(scaled, -beta)
        return np.stack([np.ones_like(x), x, -b * x * np.log(scaled)], axis=1)

    best = None
    for beta0 in BETA_STARTS:
        x = np.power(scaled, -beta0)
        (e0, b0), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)
        start = np.clip([e0, b0, beta0], [0.0, 1e-12, beta_range[0]], [np.inf, np.inf, beta_range[1]])
        found = optimize.least_squares(
            residuals,
            start,
            jac=jacobian,
            method="trf",
            x_scale="jac",
            bounds=([0.0, 0.0, beta_range[0]], [np.inf, np.inf, beta_range[1]]),
        )
        if best is None or found.cost < best.cost:
            best = found
    e, b, beta = (float(v) for v in best.x)
    if not b > 1e-12 * max(float(np.abs(y).max()), 1.0):  # flat or rising: no decreasing curve
        return None
    e_bound = best.active_mask[0] != 0 or e <= 1e-12
    e = 0.0 if e_bound else e
    sse = float(np.sum(residuals([e, b, beta]) ** 2))

    warnings, free = [], ["E", "b", "beta"]
    if e_bound:
        free.remove("E")
        warnings.append(
            "E is at its bound 0 (the losses fall too steeply for a positive asymptote): "
            "the band treats E = 0 as exact"
        )
    if best.active_mask[2] != 0:
        free.remove("beta")
        warnings.append(
            f"beta = {beta:.3f} is at the edge of its search range [{beta_range[0]:g}, "
            f"{beta_range[1]:g}]: the band treats it as exact"
        )
    fit = PowerLawFit(
        E=float(e),
        B=float(b * scale**beta),
        beta=float(beta),
        rmse=math.sqrt(sse / len(d)),
        points=len(d),
        shape=shape,
        scale=scale,
        free=tuple(free),
        warnings=warnings,
    )
    if fit.dof <= 0:
        warnings.insert(
            0,
            f"{len(d)} points for {len(free)} free parameters: the fit interpolates them, so its "
            "uncertainty is unknown; fork more checkpoints",
        )
        return fit
    jac = fit.gradient(d)
    sigma2 = sse / fit.dof
    fit.cov = sigma2 * np.linalg.pinv(jac.T @ jac)
    return fit


@dataclass(frozen=True)
class Projection:
    """Training `extra` more tokens from `now`, then cooling down for `cooldown_fraction` of the steps.

    Every token count is the one the fit's D means (tokens at the end of the cooldown):
    `now_end` = cooling down now, `target` = training on first. `hours` is the compute from now to the
    end of that later cooldown at `tokens_per_s`."""

    now: float
    extra: float
    cooldown_fraction: float
    now_end: float
    target: float
    loss_now: float
    loss: float
    band: float  # 95% half-width at `target`; NaN when unknown
    tokens_per_s: float | None

    @property
    def gain(self) -> float:
        return self.loss_now - self.loss

    @property
    def hours(self) -> float | None:
        if not self.tokens_per_s:
            return None
        return (self.target - self.now) / self.tokens_per_s / 3600.0

    def loss_text(self) -> str:
        return f"{self.loss:.4f} +- {'?' if math.isnan(self.band) else f'{self.band:.4f}'}"

    def decision(self, fmt_tokens) -> str:
        cost = (
            f"costing {self.hours:.3g} hours at this run's measured {self.tokens_per_s:.4g} tokens/s"
            if self.hours is not None
            else "at an unknown cost (the run has logged no tokens/s)"
        )
        return (
            f"training {fmt_tokens(self.extra)} more tokens, then cooling down, is projected to reach "
            f"{self.loss_text()} (gain {self.gain:.4f} nats), {cost}"
        )


def project(
    fit: PowerLawFit, now: float, extra: float, cooldown_fraction: float, tokens_per_s: float | None
) -> Projection:
    """The one projection: cooling down now vs after `extra` more tokens (same cooldown fraction)."""
    now_end = now * (1.0 + cooldown_fraction)
    target = (now + extra) * (1.0 + cooldown_fraction)
    return Projection(
        now=now,
        extra=extra,
        cooldown_fraction=cooldown_fraction,
        now_end=now_end,
        target=target,
        loss_now=float(fit(now_end)),
        loss=float(fit(target)),
        band=float(fit.band([target])[0]),
        tokens_per_s=tokens_per_s,
    )
