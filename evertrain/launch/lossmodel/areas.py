"""The LR of every step of a branch of a run, and the two areas of the loss model.

A branch is the main run's schedule up to some step, optionally with a cooldown overlay from a fork
step: exactly the schedule (evertrain/pretrain/schedule.py) the trainer and the forks use, so the
areas of a cooldown that has not run are those it will have.

    S1(s) = sum_{i<=s} lr_i                           (forward area)
    m_i   = lambda * m_{i-1} + max(lr_{i-1} - lr_i, 0)  (the drop at step i, with momentum)
    S2(s) = sum_{i<=s} m_i                             (annealing area)

The warmup's rises are no annealing, hence max(., 0). Both areas are in units of the peak LR (a step
at max_lr adds 1 to S1), so the fitted parameters do not depend on the LR's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

DECAY = 0.999  # lambda, the momentum of the annealing area (Tissue et al.'s value; fit.py tries others)


@dataclass(frozen=True)
class Areas:
    s1: np.ndarray  # s1[s - 1]: forward area after step s, in peak-LR steps
    s2: np.ndarray  # s2[s - 1]: annealing area after step s


def branch_lrs(optim_cfg, end_step: int, cooldown: tuple[int, int, str] | None = None) -> np.ndarray:
    """lr of steps 1..end_step (index s - 1) of the run's schedule, with the cooldown overlay
    (fork step, cooldown steps, shape) if given."""
    import torch

    from evertrain.pretrain.schedule import Cooldown, Schedule

    schedule = Schedule.from_config(optim_cfg, cooldown=Cooldown(*cooldown) if cooldown else None)
    return schedule(torch.arange(1, end_step + 1, dtype=torch.int64)).double().numpy()


def areas(lrs: np.ndarray, peak_lr: float, decay: float = DECAY) -> Areas:
    """S1 and S2 after every step of a branch whose step s had lr lrs[s - 1]."""
    lr = np.asarray(lrs, dtype=np.float64) / peak_lr
    drops = np.maximum(np.diff(lr, prepend=lr[:1]) * -1.0, 0.0)
    momentum = lfilter([1.0], [1.0, -decay], drops)  # m_i = decay * m_{i-1} + drop_i
    return Areas(s1=np.cumsum(lr), s2=np.cumsum(momentum))


def at_decay(a: Areas, decay: float) -> Areas:
    """The same branch's areas with the annealing area at momentum `decay` (its LRs, in units of the
    peak, are the steps of S1)."""
    return areas(np.diff(a.s1, prepend=0.0), 1.0, decay)
