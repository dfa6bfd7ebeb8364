"""The loss model of a run: predict any cooldown's final validation loss before it runs.

Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing", arXiv 2408.11029) find that the loss
after step s of any LR schedule follows

    L(s) = L0 + A * S1(s)^-alpha - C * S2(s)

with S1 the forward area (the sum of the LRs so far) and S2 the annealing area (the LR drops, carried
with momentum lambda: Tissue et al. find ~0.999; the fit picks it from the run's own curves). Fitted on
a run's own curves (the main run's and its finished cooldowns'), it predicts the curve of a schedule
that was never run: a cooldown from any step, of any length and shape.

    areas.py         the LR of every step of a branch (the run's schedule) and its S1, S2
    observations.py  what the run logged: train-loss windows and val losses of every branch
    fit.py           the least-squares fit (scipy), its covariance, predictions with a 95% interval
    predict.py       `evertrain predict`, and prediction.json beside every fork
    decision.py      the stop rule of `evertrain forker --min-gain-per-hour / --budget-*`
"""
