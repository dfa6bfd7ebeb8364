"""How much of a cooldown's gain a free estimate (a checkpoint average, no training) recovers.

For a finished cooldown from step s over c steps, ending at e = s + c:
    gain      = L(main run at e) - L(cooldown at e)         (both val losses, on the same windows)
    recovered = L(main run at e) - L(average whose newest checkpoint is e)
    fraction  = recovered / gain                             (1: as good as the cooldown; 0: no better
                                                              than the checkpoint at e itself)
Only cooldowns on the run's own data whose end step the main run evaluated count. `evertrain report`
tables these per fork and weighting; bench/free_estimates.py makes the averages and prints the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recovery:
    cooldown: str
    end_step: int
    main_loss: float
    cooldown_loss: float
    average: str  # its dir name
    weighting: str
    k: int
    average_loss: float

    @property
    def gain(self) -> float:
        return self.main_loss - self.cooldown_loss

    @property
    def fraction(self) -> float | None:
        """None when the cooldown gained nothing (a fraction of ~0 means nothing)."""
        return (self.main_loss - self.average_loss) / self.gain if abs(self.gain) > 1e-9 else None


def recoveries(
    main_val: dict[int, float], cooldowns: list[tuple[str, int, float]], averages: list[dict]
) -> list[Recovery]:
    """`main_val`: {step: the main run's val loss}; `cooldowns`: (name, end step, val loss) on the run's
    own data; `averages`: their result.json. One Recovery per (cooldown, average ending at its end)."""
    out = []
    for name, end, loss in cooldowns:
        if end not in main_val:
            continue
        for a in averages:
            if a["step"] == end:
                out.append(
                    Recovery(
                        name,
                        end,
                        main_val[end],
                        loss,
                        a.get("name", ""),
                        a.get("weighting", "uniform"),
                        len(a["steps"]),
                        a["val_loss"],
                    )
                )
    return sorted(out, key=lambda r: (r.end_step, r.cooldown, r.weighting, r.k))
