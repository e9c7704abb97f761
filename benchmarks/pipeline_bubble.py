"""The pipeline bubble of each ``parallel.pp_schedule`` at equal forward, input-gradient and
weight-gradient times: closed formulas, checked against the schedules' own action lists.

Each schedule of ``torch.distributed.pipelining`` fixes, per pipeline rank, the order of its
compute actions: F (forward of one chunk and micro-batch), I (input gradient), W (weight
gradient), B (a whole backward, I then W) and DualPipeV's F+B pairs. :func:`simulate` plays
those lists with every F, I and W lasting one unit (a B two) and free point-to-point
traffic: an action starts when its rank is free and its inputs exist (F after the previous
chunk's F of the same micro-batch, I after the next chunk's I, or after its own F on the
last chunk; W after its own I). A rank's idle share is ``1 - busy / step``, the step being
the last action's end on any rank (consecutive steps do not overlap: the optimizer step
sits between them), averaged over ranks, as ``benchmarks/train.py --bubble`` measures it.

The formulas, for ``p`` ranks, ``v`` chunks per rank and ``m`` micro-batches (each rank
busy ``3 v m`` units a step):

* ``1f1b``: ``(p-1) / (m + p-1)``; interleaved 1F1B (``pp_virtual = v``):
  ``(p-1) / (v m + p-1)`` (for ``m >= p``);
* ``interleaved-zb``: ``(p-1) / (3 v m + p-1)`` (for ``m >= p``): each rank idles
  ``p - 1`` units, a third of one chunk's forward and backward, where interleaved 1F1B
  idles ``3 (p-1)``: the weight gradients, which no other rank waits for, fill the rest;
* ``zbv``: ``u / (6 m + u)`` with ``u = max(p-1, 2 (2p-1-m))`` idle units: the same
  ``p - 1`` as interleaved-zb once ``m >= 2p - 2``; with fewer micro-batches the V cannot
  fill (torch plans the schedule for ``2p - 1`` and leaves the missing ones' slots empty);
* ``dualpipev`` (``m >= 2p``): ``(p-1) / (6 m + p-1)``, as zbv: on one device its forward
  and backward pairs run one after the other, so what it adds on GPUs (a pair's
  communication hidden under the other's compute) does not show here.

The ``p - 1`` units that remain are the fill: the last rank's first forward waits for
``p - 1`` forwards upstream (and the first rank's last weight gradient for the backward
to come back), which no reordering removes. With weight gradients cheaper than the other
two the zero-bubble schedules idle more (the paper's ``(p-1)(F + B - W)`` per chunk for
ZB1P, F, B, W the three times).

    python benchmarks/pipeline_bubble.py      # the table, and every formula checked

Uses ``_calculate_single_rank_operations`` of torch's schedule classes (the plan each rank
runs), built without processes.
"""

from __future__ import annotations

import sys

PER_RANK_CHUNKS = {"1f1b": 1, "interleaved-1f1b": 2, "interleaved-zb": 2, "zbv": 2, "dualpipev": 2}


def formula(schedule: str, p: int, m: int, v: int = 2) -> float:
    """Idle share of a step at equal F, I, W times (see the module docstring)."""
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "interleaved-zb":
        return (p - 1) / (3 * v * m + p - 1)
    if schedule == "zbv":
        idle = max(p - 1, 2 * (2 * p - 1 - m))
        return idle / (6 * m + idle)
    if schedule == "dualpipev":
        return (p - 1) / (6 * m + p - 1)
    raise ValueError(f"unknown schedule {schedule!r}")


def runs(schedule: str, p: int, m: int) -> bool:
    """Whether torch runs ``schedule`` with ``p`` ranks and ``m`` micro-batches and the
    formula covers it (the interleaved schedules: ``m >= p`` and a multiple of its rounds)."""
    if schedule == "dualpipev":
        return m >= 2 * p
    if schedule.startswith("interleaved"):
        return m >= p and m % max(1, m // p) == 0
    return m >= 1


def rank_actions(schedule: str, p: int, m: int, v: int = 2) -> dict[int, list]:
    """Each rank's compute actions in order, as the torch schedule plans them."""
    from torch.distributed.pipelining import schedules as s

    if schedule == "1f1b":  # warm-up forwards, then one forward one backward, then the rest
        out = {}
        for r in range(p):
            warm = min(m, p - 1 - r)
            acts = [s._Action(r, s.FORWARD, i) for i in range(warm)]
            for i in range(m - warm):
                acts += [s._Action(r, s.FORWARD, warm + i), s._Action(r, s.FULL_BACKWARD, i)]
            acts += [s._Action(r, s.FULL_BACKWARD, i) for i in range(m - warm, m)]
            out[r] = acts
        return out
    cls = {"interleaved-1f1b": s.ScheduleInterleaved1F1B, "interleaved-zb": s.ScheduleInterleavedZeroBubble,
           "zbv": s.ScheduleZBVZeroBubble, "dualpipev": s.ScheduleDualPipeV}[schedule]
    plan = cls.__new__(cls)  # the planning methods need only these attributes, no stages
    plan.pp_group_size, plan._n_microbatches, plan.n_local_stages = p, m, v
    plan.num_stages = plan._num_stages = p * v
    plan.number_of_rounds = max(1, m // p)
    plan.microbatches_per_round = m // plan.number_of_rounds
    plan.pipeline_order = {r: plan._calculate_single_rank_operations(r) for r in range(p)}
    if schedule == "interleaved-zb":
        plan.pipeline_order = plan._add_bubbles_to_actions(p * v)
    out = {}
    for r, order in plan.pipeline_order.items():
        acts = []
        for a in order:
            if a is not None:
                acts.extend(a.sub_actions if a.computation_type == s.OVERLAP_F_B else [a])
        out[r] = acts
    return out


def simulate(schedule: str, p: int, m: int, v: int = 2) -> float:
    """Idle share of a step when every F, I and W takes one unit (a whole B two)."""
    from torch.distributed.pipelining import schedules as s

    if not schedule.startswith("interleaved"):
        v = PER_RANK_CHUNKS[schedule]
    last = p * v - 1
    cost = {s.FORWARD: 1, s.BACKWARD_INPUT: 1, s.BACKWARD_WEIGHT: 1, s.FULL_BACKWARD: 2}
    makes = {s.FORWARD: ("F",), s.BACKWARD_INPUT: ("I",), s.BACKWARD_WEIGHT: ("W",), s.FULL_BACKWARD: ("I", "W")}

    def needs(a) -> list[tuple]:
        k, t, i = a.stage_index, a.computation_type, a.microbatch_index
        if t == s.FORWARD:
            return [("F", k - 1, i)] if k > 0 else []
        if t == s.BACKWARD_WEIGHT:
            return [("I", k, i)]
        return [("F", k, i)] + ([("I", k + 1, i)] if k < last else [])

    actions = rank_actions(schedule, p, m, v)
    done: dict[tuple, int] = {}
    at = {r: 0 for r in actions}
    clock = {r: 0 for r in actions}
    busy = {r: 0 for r in actions}
    while any(at[r] < len(actions[r]) for r in actions):
        moved = False
        for r, acts in actions.items():
            while at[r] < len(acts) and all(n in done for n in needs(acts[at[r]])):
                a = acts[at[r]]
                end = max([clock[r]] + [done[n] for n in needs(a)]) + cost[a.computation_type]
                for kind in makes[a.computation_type]:
                    done[(kind, a.stage_index, a.microbatch_index)] = end
                clock[r], busy[r], at[r], moved = end, busy[r] + cost[a.computation_type], at[r] + 1, True
        if not moved:
            raise RuntimeError(f"{schedule}: the ranks' plans wait on each other (p={p}, m={m})")
    step = max(clock.values())
    return sum(1 - b / step for b in busy.values()) / len(busy)


def check(ps=range(2, 9), extra_m: int = 3) -> list[tuple]:
    """(schedule, v, p, m, simulated, formula) of every case where the two differ."""
    wrong = []
    for schedule in PER_RANK_CHUNKS:
        for v in ((2, 3, 4) if schedule.startswith("interleaved") else (PER_RANK_CHUNKS[schedule],)):
            for p in ps:
                for m in range(1, 4 * p + extra_m):
                    if runs(schedule, p, m):
                        got, want = simulate(schedule, p, m, v), formula(schedule, p, m, v)
                        if abs(got - want) > 1e-9:
                            wrong.append((schedule, v, p, m, got, want))
    return wrong


def main() -> int:
    ms = (2, 4, 8, 16, 32)
    print("idle share of a step at equal F, I, W times (v = 2 chunks per rank where there are several)")
    print(f"{'schedule':17s} {'p':>2s} " + " ".join(f"m={m:<5d}" for m in ms))
    for schedule in PER_RANK_CHUNKS:
        for p in (2, 4, 8):
            cells = [f"{100 * simulate(schedule, p, m):5.1f}% " if runs(schedule, p, m) else "   -   " for m in ms]
            print(f"{schedule:17s} {p:2d} " + " ".join(cells))
    wrong = check()
    print("formulas: " + ("all equal to the simulation (p = 2..8, m = 1..4p+2, v = 2..4)" if not wrong
                          else f"{len(wrong)} differ, e.g. {wrong[:5]}"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
