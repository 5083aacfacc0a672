"""SABA: SOBA with SAGA variance reduction on every direction (Dagréou et al., 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bilevel.settings import Fixed
from bilevel.state import Objective
from bilevel.ul.base import Grads
from bilevel.ul.sampling import SAME, Minibatch, Sampler, num_samples, select
from bilevel.ul.stochastic import LLStep, StochasticMethod, Tensors, dense

#: the directions SABA keeps a memory of, per level: LL-shaped or UL-shaped
TERMS = {"train": ("ll_grad", "hvp", "cross"), "val": ("ul_grad_y", "ul_grad_x")}
_UL_SHAPED = ("cross", "ul_grad_x")


class _Group:
    """The part of a level's memory held in one flat buffer: the term tensors of one device
    and dtype, laid end to end (``slots`` are ``(term, index)`` in that order)."""

    def __init__(self, count: int, slots: list[tuple[str, int]], like: list[torch.Tensor]):
        self.slots = slots
        self.shapes = [tuple(p.shape) for p in like]
        self.sizes = [p.numel() for p in like]
        self.flat = all(len(shape) == 1 for shape in self.shapes)  # no reshape needed
        self.table = like[0].new_zeros((count, sum(self.sizes)))
        self.average = like[0].new_zeros(sum(self.sizes))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (the last dimension laid out as the slots) cut into the slots' shapes."""
        pieces = flat.split_with_sizes(self.sizes, dim=-1)
        if self.flat:
            return list(pieces)
        lead = tuple(flat.shape[:-1])
        return [p.view((*lead, *shape)) for p, shape in zip(pieces, self.shapes, strict=True)]

    def gather(self, values: Mapping[str, Tensors]) -> torch.Tensor:
        """The slots' new values as one flat vector (a copy, without graph)."""
        parts = [values[term][i] for term, i in self.slots]
        if not self.flat:
            parts = [p.reshape(-1) for p in parts]
        new = torch.cat(parts)
        return new.detach() if new.requires_grad else new


class _Memory:
    """SAGA's table for one level: the last value of each term on each fixed batch, and
    their weighted average (the weights ``len(batch) / n`` sum to one).

    The terms are held flat, one row per batch with every term of the level end to end (one
    buffer per device and dtype), so that a step updates the level with a handful of tensor
    operations whatever the number of terms and parameters; ``tables`` and ``average`` are
    per-term views of it (the checkpoint format: ``{term: [tensor per parameter]}``)."""

    def __init__(self, count: int, n: int, terms: Mapping[str, Sequence[torch.Tensor]]):
        self.count = count
        self.n = n
        self.terms = {term: len(like) for term, like in terms.items()}
        keyed: dict[tuple[torch.device, torch.dtype], list[tuple[str, int]]] = {}
        for term, like in terms.items():
            for i, p in enumerate(like):
                keyed.setdefault((p.device, p.dtype), []).append((term, i))
        self.groups = [
            _Group(count, slots, [terms[t][i] for t, i in slots]) for slots in keyed.values()
        ]
        self.tables: dict[str, Tensors] = {t: [None] * k for t, k in self.terms.items()}  # type: ignore[misc]
        self.average: dict[str, Tensors] = {t: [None] * k for t, k in self.terms.items()}  # type: ignore[misc]
        for group in self.groups:
            slots = group.slots
            for (t, i), view in zip(slots, group.views(group.table), strict=True):
                self.tables[t][i] = view
            for (t, i), view in zip(slots, group.views(group.average), strict=True):
                self.average[t][i] = view

    @classmethod
    def zeros(cls, count: int, n: int, terms: Mapping[str, Sequence[torch.Tensor]]) -> _Memory:
        """An empty memory (zeros) for ``count`` batches of terms shaped like ``terms``."""
        return cls(count, n, terms)

    def reduce(
        self, values: Mapping[str, Tensors], mb: Minibatch, pending: list[Callable[[], None]]
    ) -> dict[str, Tensors]:
        """SAGA's direction for every term from its new values on batch ``mb``:
        ``weight (new - old) + average``, with ``weight = count len(batch) / n`` (1 for batches
        of equal size), which keeps it unbiased when batches differ in size. The update of
        the table and the average (to the new values) is appended to ``pending``."""
        out: dict[str, Tensors] = {t: [None] * k for t, k in self.terms.items()}  # type: ignore[misc]
        updates = []
        for group in self.groups:  # no graph: the new values and the buffers have none
            new = group.gather(values)
            row = group.table[mb.id]
            diff = new - row
            estimate = (diff if mb.weight == 1.0 else mb.weight * diff) + group.average
            for (t, i), view in zip(group.slots, group.views(estimate), strict=True):
                out[t][i] = view
            updates.append((group, row, new, diff))

        def update() -> None:
            share = mb.weight / mb.count  # len(batch) / n
            for group, row, new, diff in updates:
                group.average.add_(diff, alpha=share)
                row.copy_(new)

        pending.append(update)
        return out

    def fill(self, values: Mapping[str, Tensors], mb: Minibatch) -> None:
        """Store ``values`` (every term) as batch ``mb``'s entry (memory initialization)."""
        with torch.no_grad():
            for group in self.groups:
                new = group.gather(values)
                group.table[mb.id] = new
                group.average.add_(new, alpha=mb.weight / mb.count)

    def state(self) -> dict[str, Any]:
        """``{"count", "n", "tables": {term: [tables]}, "average": {term: [averages]}}``."""
        return {"count": self.count, "n": self.n, "tables": self.tables, "average": self.average}

    def load(self, tables: Mapping[str, Tensors], average: Mapping[str, Tensors]) -> None:
        """Copy saved tables and averages (already checked to fit) into the memory."""
        with torch.no_grad():
            for term in self.terms:
                for mine, saved in zip(self.tables[term], tables[term], strict=True):
                    mine.copy_(saved)
                for mine, saved in zip(self.average[term], average[term], strict=True):
                    mine.copy_(saved)


def _check_memory_init(value: Any, name: str) -> str:
    """``"full"`` or ``"zero"``."""
    if value not in ("full", "zero"):
        raise ValueError(f"{name} must be 'full' or 'zero', got {value!r}.")
    return value


class SABA(StochasticMethod):
    """SABA (Stochastic Average Bilevel Algorithm): SOBA's three directions with SAGA
    variance reduction on each of their five terms, and constant step sizes::

        y <- y - rho  S[grad_y G]
        v <- v - rho (S[grad_yy G v] + S[grad_y F])
        x <- x - gamma (S[grad_xy G v] + S[grad_x F])

    where ``S[.]`` is SAGA's estimate ``weight (f_b - m_b) + mean(m)`` of a term: ``f_b`` is
    its value on the drawn minibatch ``b`` at the current point, ``m_b`` its value stored
    when ``b`` was last drawn, ``mean(m)`` the average of the table (weighted by the batches'
    sizes), and ``weight = count len(b) / n`` (1 for batches of equal size). The train
    terms share the train minibatch ``i``, the validation terms the validation minibatch ``j``.
    Memory is one table per term of ``count`` fixed batches (see
    :class:`~bilevel.ul.sampling.Sampler`; a level with a single batch keeps none and SABA is
    then SOBA there). With full batches on both levels SABA is SOBA with constant steps.

    The paper proves an ``O(1/T)`` rate for the mean squared hypergradient norm with constant
    steps, and linear convergence when the value function satisfies a Polyak-Lojasiewicz
    inequality: the first stochastic bilevel method with either. ``rho = ll.lr`` (``ll`` must
    be ``GradientDescent(..., iters=1)`` with plain SGD); ``gamma`` is the UL optimizer's
    learning rate (``torch.optim.SGD``).

    ``memory_init="full"`` (default) fills the tables at the initial point with one pass over
    every batch before the first step (SAGA's initialization, as in the paper); ``"zero"``
    starts them at zero (benchopt's default; the estimates are then biased during the first
    epoch).

    Cost per iteration: as SOBA (one LL gradient, one Hessian-vector and cross product, one UL
    gradient), plus a pass over all batches at the first step with ``"full"``. Memory:
    ``count_train (2 |y| + |x|) + count_val (|y| + |x|)`` numbers for the tables.

    Reference: Dagréou, Ablin, Vaiter & Moreau (2022), "A framework for bilevel optimization
    that enables stochastic and global variance reduction algorithms", NeurIPS.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F`` (a mean over its batch).
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL loss ``G`` (a mean over its batch).
        ll_model: the LL module; its trainable parameters are ``y``.
        memory_init: ``"full"`` or ``"zero"`` (see above).
        batch_size: samples per train minibatch (see
            :class:`~bilevel.ul.stochastic.StochasticMethod`).
        val_batch_size: samples per validation minibatch (``"same"``: ``batch_size``).
        seed: seeds the default sampler's generator.
        sampler: a sampler to use instead; the sampler must draw from
            fixed batches (:class:`~bilevel.ul.sampling.Sampler` does).
    """

    name = "saba"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        memory_init: str = "full",
        batch_size: int | None = 64,
        val_batch_size: int | str | None = SAME,
        seed: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__(
            ul_objective,
            ul_model,
            ll_objective,
            ll_model,
            batch_size,
            val_batch_size,
            seed,
            sampler,
        )
        self.memory_init = memory_init
        #: SAGA's tables per level (``None``: not yet made; absent: a single batch)
        self.memory: dict[str, _Memory] | None = None

    memory_init = Fixed(
        "it says how SAGA's tables are filled when the first step makes them, and they are "
        "kept (and checkpointed) from then on",
        _check_memory_init,
    )

    def settings(self) -> dict[str, Any]:
        """Memory initialization and the sampler's settings."""
        return {"memory_init": self.memory_init, **super().settings()}

    def _shapes(self, level: str) -> dict[str, list[torch.Tensor]]:
        ll_like, ul_like = self.ll_trainable, self.ul_params
        return {k: list(ul_like if k in _UL_SHAPED else ll_like) for k in TERMS[level]}

    def _make_memory(self, model: nn.Module, train: Any, val: Any) -> dict[str, _Memory]:
        memory = {}
        for level, pair in (("train", train), ("val", val)):
            if self.sampler.batch_sizes.get(level, 1) is None:
                continue  # the data as given: no table
            n = num_samples(*pair, level)
            count = self.sampler.count(level, n)
            if count == 1:
                continue
            memory[level] = _Memory.zeros(count, n, self._shapes(level))
            if self.memory_init == "zero":
                continue
            self.sampler.split(level, n)
            y, v = self.leaves(), self.initial_v()
            for b in range(count):
                mb = self.sampler.batch(level, b)
                batch = (select(pair[0], mb.index), select(pair[1], mb.index))
                memory[level].fill(self._terms(level, model, y, v, mb, batch)[2], mb)
        return memory

    def _terms(
        self, level: str, model: nn.Module, y: Tensors, v: Tensors, mb: Minibatch, batch: Any
    ) -> tuple[torch.Tensor, Grads, dict[str, Tensors]]:
        """(loss, the raw UL-shaped term with its ``None`` for UL parameters it does not
        reach, the terms) of one level on one batch, unweighted."""
        plain = Minibatch(mb.index, mb.id, mb.count, 1.0)
        if level == "train":
            loss, gy, hv, cv = self.ll_products(model, y, plain, batch, v)
            return loss, cv, {"ll_grad": gy, "hvp": hv, "cross": dense(self.ul_params, cv)}
        loss, fy, fx = self.ul_gradients(model, y, plain, batch)
        return loss, fx, {"ul_grad_y": fy, "ul_grad_x": dense(self.ul_params, fx)}

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SABA iteration on minibatches of the full ``train`` and ``val`` data (the
        first one also fills the memory); returns the minibatch UL and LL losses at the point
        before the step (detached)."""
        rho = self.ll_lr(ll)
        model = ll.patched_model(graph_from_start=False)
        try:
            # a memory made here is kept only if the step is (commit): a refused first step
            # would otherwise leave its NaN in the tables, and every later step refused
            memory_all = self.memory
            if memory_all is None:
                memory_all = self._make_memory(model, train, val)
            y, v = self.leaves(), self.initial_v()
            reduced: dict[str, Tensors] = {}
            losses, raw, drawn = {}, {}, {}
            pending: list[Callable[[], None]] = []  # the tables' updates, once checked
            for level, pair in (("train", train), ("val", val)):
                mb, batch = self.draw(level, pair)
                drawn[level] = mb, batch
                losses[level], raw[level], terms = self._terms(level, model, y, v, mb, batch)
                memory = memory_all.get(level)
                if memory is None:  # one batch: the terms themselves (weight 1)
                    self._check_single(level, mb)
                    reduced.update(terms)
                else:
                    self._check_memory(memory, level, mb)
                    reduced.update(memory.reduce(terms, mb, pending))
            # refuse UL parameters that neither objective reaches, before using the sums
            pairs = zip(raw["val"], raw["train"], strict=True)
            self._refuse_unused([c if f is None else f for f, c in pairs])
            with torch.no_grad():
                direction = [
                    f + c for f, c in zip(reduced["ul_grad_x"], reduced["cross"], strict=True)
                ]
                new_y = [w - rho * g for w, g in zip(y, reduced["ll_grad"], strict=True)]
                new_v = [
                    u - rho * (h + f)
                    for u, h, f in zip(v, reduced["hvp"], reduced["ul_grad_y"], strict=True)
                ]
        finally:
            ll.release(model)
        self.diagnostics.update(ll_lr=rho)
        return self.finish(
            losses["train"],
            losses["val"],
            direction,
            new_y,
            new_v,
            commit=lambda: self._commit_memory(memory_all, pending),
            step=LLStep(ll, y, *drawn["train"], rho),
        )

    def _commit_memory(self, memory: dict[str, _Memory], pending: list[Callable[[], None]]) -> None:
        """Keep ``memory`` (made at this step, or the one kept) and apply the step's updates."""
        self.memory = memory
        for update in pending:
            update()

    def _check_single(self, level: str, mb: Minibatch) -> None:
        """Refuse a drawn batch of a split into several where the memory was made for a
        level taken whole: without a table its terms would go unweighted and unreduced (SOBA's
        steps, silently)."""
        if mb.count != 1:
            raise ValueError(
                f"SABA keeps no {level} memory: its {level} data were taken whole (one batch) "
                f"when the memory was made, but the sampler now splits them into {mb.count} "
                "batches: the data set changed. Pass the same full data at every step, or start "
                "a new SABA."
            )

    def _check_memory(self, memory: _Memory, level: str, mb: Minibatch) -> None:
        if mb.count != memory.count or mb.index is None:
            raise ValueError(
                f"SABA's {level} memory holds {memory.count} batches, but the sampler drew a "
                f"batch of a split into {mb.count}: the data set or the sampler changed. Pass "
                "the same full data at every step, or start a new SABA."
            )

    def _extra_state(self) -> dict[str, Any]:
        if self.memory is None:
            return {"memory": None}
        return {"memory": {level: m.state() for level, m in self.memory.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("memory")
        if saved is None:
            self.memory = None
            return
        memory = {}
        for level, m in saved.items():
            if level not in TERMS:
                raise ValueError(f"SABA memory has an unknown level {level!r}.")
            count = int(m["count"])
            shapes = self._shapes(level)
            for term in TERMS[level]:
                params = shapes[term]
                saved_tables = list(m["tables"][term])
                if len(saved_tables) != len(params) or any(
                    tuple(t.shape) != (count, *p.shape)
                    for t, p in zip(saved_tables, params, strict=True)
                ):
                    raise ValueError(
                        f"the saved SABA memory {term!r} does not fit the model: the checkpoint "
                        "is of another model."
                    )
                self._like(m["average"][term], params, f"SABA memory {term}")
            memory[level] = _Memory(count, int(m["n"]), shapes)
            memory[level].load(m["tables"], m["average"])
        self.memory = memory
