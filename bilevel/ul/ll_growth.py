"""Growth of the LL loss across the UL steps of the methods that keep the LL variables: a
single-loop one (SOBA, SABA), which takes one LL step per UL step and so has no run of LL
steps at one UL point to compare, the warm-started inner loops of StocBiO and AmIGO, whose
few steps per UL step, each on a new minibatch, compare no better, and the first-order
methods (``bilevel.ul.value_function``, which confirm by their own updates instead).

A diverging LL multiplies its loss at every step (by ``(1 - lr lambda)^2`` along the
Hessian's eigenvector of eigenvalue ``lambda > 2 / lr``). :class:`RisingLoss` follows the LL
loss of each UL step (on that step's minibatch, at that step's UL point) and calls a step
suspect where its loss is more than ``1 + FACTOR`` times every loss before the last
``WINDOW`` steps. The method then confirms at the step's own UL point and train minibatch,
where the UL variables do not move: one SGD step of the LL step size raises that minibatch's
loss, or the largest eigenvalue of its Hessian (power iteration) is above ``2 / lr``, only
where the step is too large for the LL's curvature. Confirming costs a gradient, a loss and
20 Hessian-vector products, on suspect steps only; the rest costs no tensor work (the
loss's value is read after the step's finiteness check, whose host sync it shares)."""

from __future__ import annotations

from typing import Any

# The latest UL steps, whose LL losses are not yet compared with: a diverging LL passes twice
# every earlier loss within a few steps (SOBA's, with a step 1.35 times the stable one,
# grew 1.6x per UL step, from 4 to 1e72 in 380 steps, and on); a converging LL,
# whose loss may rise while the UL variables move its objective, rarely does within 10.
WINDOW = 10
# ... more than (1 + FACTOR) times every LL loss before them: the suspect steps.
FACTOR = 1.0


class RisingLoss:
    """The LL losses of the UL steps so far, as much of them as the test needs: the last
    ``WINDOW`` (``recent``), the largest before them (``peak``) and the latest loss whose
    suspicion was cleared by the confirmation (``cleared``: a loss that the UL variables
    raise is confirmed again only once it has grown ``1 + FACTOR`` times more, so that a
    long rise costs a few confirmations, not one per step). :meth:`suspect` reads,
    :meth:`record` (with the step's commit) writes."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self.recent: list[float] = []
        self.cleared: float | None = None

    def suspect(self, loss: float) -> bool:
        """Whether ``loss`` is more than ``1 + FACTOR`` times every LL loss before the last
        ``WINDOW`` steps (never during the first ``WINDOW`` steps) and than the last loss
        cleared."""
        return self.peak is not None and all(
            loss > level + FACTOR * abs(level)
            for level in (self.peak, self.cleared)
            if level is not None
        )

    def record(self, loss: float, cleared: bool = False) -> None:
        """Count a step's LL loss (once the step is taken); ``cleared``: it was suspect, and
        the confirmation found the LL step stable."""
        if cleared:
            self.cleared = loss
        self.recent.append(loss)
        if len(self.recent) > WINDOW:
            oldest = self.recent.pop(0)
            self.peak = oldest if self.peak is None else max(self.peak, oldest)

    def state(self) -> dict[str, Any]:
        """Plain values, for the method's checkpoint state."""
        return {"peak": self.peak, "recent": list(self.recent), "cleared": self.cleared}

    def load(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state` (``None``, from a checkpoint written before the check
        existed: start afresh)."""
        state = state or {}
        peak, cleared = state.get("peak"), state.get("cleared")
        self.peak = None if peak is None else float(peak)
        self.recent = [float(v) for v in state.get("recent", [])]
        self.cleared = None if cleared is None else float(cleared)


def divergence_message(method: str, t: int, loss: float, peak: float, evidence: str) -> str:
    """What a confirmed divergence is told: the growth, the ``evidence`` at this step's UL
    point, and the cure."""
    return (
        f"{method} step {t}: the LL loss, {loss:.4g}, is more than {1 + FACTOR:g} times every "
        f"LL loss before the last {WINDOW} UL steps (the largest: {peak:.4g}), and at this "
        f"step's UL point {evidence}: the LL is diverging. Lower the LL step size ll.lr (below "
        "2 / the largest curvature of every minibatch's LL loss); the state was left as it was "
        "before this step. (GradientDescent(..., on_growth='warn' or 'ignore') would let it "
        "through.)"
    )
