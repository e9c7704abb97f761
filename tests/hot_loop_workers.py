"""Per-process body of the hot-loop test: ``train()`` under a :class:`mtnlg.dist.SyncCounter`,
the counter's reading taken at the start of every optimizer step, so each step's count
covers its forward, backward, update and the bookkeeping after it."""

from __future__ import annotations


def counted_training(rank: int, world: int, data_path: str, runs: list) -> list[dict]:
    """One :func:`counted_run` per ``(output, overrides)`` in ``runs``, in one spawn."""
    return [counted_run(data_path, out, overrides) for out, overrides in runs]


def counted_run(data_path: str, out: str, overrides: list[str]) -> dict:
    from mtnlg.config import load_config
    from mtnlg.dist import SyncCounter
    from mtnlg.train import trainer as T
    from mtnlg.train.config import TrainRunConfig, recipe

    cfg = load_config(TrainRunConfig, None, [f"data.path={data_path}", f"output={out}", *overrides],
                      base=recipe("debug"))
    counter = SyncCounter()
    marks: dict[int, int] = {}
    names: dict[int, list[str]] = {}
    real = T.Trainer.optimizer_step

    def marked(self, stop_requested):
        marks[self.state.step + 1] = counter.count
        return real(self, stop_requested)

    T.Trainer.optimizer_step = marked
    try:
        with counter:
            T.train(cfg)
    finally:
        T.Trainer.optimizer_step = real
    steps = sorted(marks)
    bounds = [marks[k] for k in steps] + [counter.count]
    per_step = {str(k): bounds[i + 1] - bounds[i] for i, k in enumerate(steps)}
    for i, k in enumerate(steps):
        names[k] = counter.calls[bounds[i]:bounds[i + 1]][:8]
    return {"per_step": per_step, "names": {str(k): v for k, v in names.items()}}
