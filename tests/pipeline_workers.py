"""Per-process bodies of the pipeline-parallel tests (run by ``tests/distributed.py``).

Each rank trains the tiny untied GPT of ``parallel_workers`` for ``STEPS`` AdamW steps
with a pipeline layout (the global batch of ``BATCH`` rows split into micro-batches) and
returns the losses and clipped gradient norms; the single-process reference is
``parallel_workers.training(cfg, None, ...)`` on the same batches.
"""

from __future__ import annotations

import torch
from parallel_workers import MAX_NORM, STEPS, tiny, tokens_for_step, training

from mtnlg.model.gpt import GPT
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.pipeline_parallel import PipelineParallel
from mtnlg.parallel.utils import clip_grad_norm_, set_seed_for_rank

PP_MODEL = dict(tie_embeddings=False, num_layers=4)
TIED = dict(tie_embeddings=True, num_layers=4)


def pipeline_training(pc: ParallelConfig, world: int, n_micro: int = 2, model: dict = PP_MODEL,
                      evaluate: bool = False) -> dict:
    cfg = tiny(**model)
    dims = ParallelDims.build(pc, world, cfg)
    mesh = dims.build_mesh("cpu")
    set_seed_for_rank(0)
    pipe = PipelineParallel(GPT(cfg, tp=dims.tp), mesh, dims, pc, torch.device("cpu"))
    model = pipe.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms, evaluated = [], [], []
    for step in range(STEPS):
        tokens = tokens_for_step(step)
        b = tokens.shape[0] // dims.dp
        r = dims.dp_rank(mesh)
        rows = tokens[r * b:(r + 1) * b]
        if evaluate and step == 0:  # forward-only, twice, on the first batch, known everywhere
            for _ in range(2):
                loss = pipe.evaluate(rows[:, :-1], rows[:, 1:], n_micro)
                t = torch.tensor([float(loss) if loss is not None else 0.0])
                torch.distributed.all_reduce(t)
                evaluated.append(float(t) / (world // dims.pp))
        loss = pipe.forward_backward(rows[:, :-1], rows[:, 1:], n_micro)
        # mean over the last stage's data-parallel ranks, known everywhere
        t = torch.tensor([float(loss) if loss is not None else 0.0])
        torch.distributed.all_reduce(t)
        losses.append(float(t) / (world // dims.pp))
        norms.append(float(clip_grad_norm_(model.parameters(), MAX_NORM, pp_group=mesh.get_group("pp"),
                                           duplicates=pipe.tied_copy)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    names = sorted(n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters())
    tied = pipe.tied_weight()
    if tied is not None:  # this rank's copy of the tied table, whole, to compare across stages
        from torch.distributed.tensor import DTensor

        import hashlib

        whole = (tied.full_tensor() if isinstance(tied, DTensor) else tied).detach()
        tied = hashlib.sha256(whole.contiguous().numpy().tobytes()).hexdigest()
    return {"losses": losses, "grad_norms": norms, "names": names, "pp_rank": dims.pp_rank(mesh),
            "chunks": [sorted(int(i) for i in c.layers) for c in pipe.chunks], "tied": tied,
            "tied_copies": _tied_copies(pipe) if cfg.tie_embeddings else [], "evaluated": evaluated}


def _tied_copies(pipe) -> list[str]:
    """sha256 of every copy of the tied table this rank holds (the first stage's
    tok_embeddings, the last stage's output; both on rank 0 of a V)."""
    import hashlib

    from torch.distributed.tensor import DTensor

    copies = []
    for held, name in ((pipe.first, "tok_embeddings"), (pipe.last, "output")):
        if held:
            w = getattr(pipe.model, name).weight
            whole = (w.full_tensor() if isinstance(w, DTensor) else w).detach()
            copies.append(hashlib.sha256(whole.contiguous().numpy().tobytes()).hexdigest())
    return copies


def zero_bubble_training(pc: ParallelConfig, world: int, n_micro: int, model: dict = PP_MODEL) -> dict:
    """``pipeline_training`` with a count of the weight-gradient passes the schedule ran
    (``backward_weight_one_chunk``: the second half of a backward split in two)."""
    from torch.distributed.pipelining import stage

    original = stage._PipelineStageBase.backward_weight_one_chunk
    calls = [0]

    def counted(self, *args, **kwargs):
        calls[0] += self.has_backward  # a forward-only run calls it to do nothing
        return original(self, *args, **kwargs)

    stage._PipelineStageBase.backward_weight_one_chunk = counted
    try:
        out = pipeline_training(pc, world, n_micro=n_micro, model=model, evaluate=True)
    finally:
        stage._PipelineStageBase.backward_weight_one_chunk = original
    out["weight_passes"] = calls[0]
    return out


def zb(schedule: str, **kw) -> ParallelConfig:
    return ParallelConfig(pp=2, pp_virtual=2, pp_schedule=schedule, **kw)


def two_process_checks(rank: int, world: int) -> dict:
    return {
        "single": training(tiny(**PP_MODEL), None, world),
        "pp2-1f1b": pipeline_training(ParallelConfig(pp=2), world),
        "pp2-gpipe": pipeline_training(ParallelConfig(pp=2, pp_schedule="gpipe"), world, n_micro=4),
        # one micro-batch for two stages: 1F1B steps of a ramp-up run fill-drain
        "pp2-1f1b-one-micro": pipeline_training(ParallelConfig(pp=2), world, n_micro=1),
        "single-tied": training(tiny(**TIED), None, world),
        "pp2-tied": pipeline_training(ParallelConfig(pp=2), world, model=TIED),
        "pp2x2-interleaved-tied": pipeline_training(ParallelConfig(pp=2, pp_virtual=2), world, n_micro=4,
                                                    model=TIED),
        # zero-bubble schedules: the backward split into input and weight gradients
        "pp2x2-interleaved-zb": zero_bubble_training(zb("interleaved-zb"), world, n_micro=4),
        "pp2x2-zbv-tied": zero_bubble_training(zb("zbv"), world, n_micro=4, model=TIED),
        "pp2x2-dualpipev-tied": zero_bubble_training(zb("dualpipev"), world, n_micro=4, model=TIED),
        # fewer micro-batches than DualPipeV's 2 * pp (a ramp-up step): ZBV in the same V
        "pp2x2-dualpipev-two-micro": zero_bubble_training(zb("dualpipev"), world, n_micro=2),
    }


def four_process_checks(rank: int, world: int) -> dict:
    return {
        "single": training(tiny(**PP_MODEL), None, world),
        "pp2xtp2": pipeline_training(ParallelConfig(pp=2, tp=2), world),
        "pp2xdp2-fsdp": pipeline_training(ParallelConfig(pp=2, fsdp=True), world),
        "pp2xtp2+sp+full-ac": pipeline_training(ParallelConfig(
            pp=2, tp=2, sequence_parallel=True, activation_checkpoint="full"), world),
        "single-tied": training(tiny(**TIED), None, world),
        "pp2x2-interleaved-tied+tp2": pipeline_training(ParallelConfig(pp=2, pp_virtual=2, tp=2), world,
                                                        n_micro=2, model=TIED),
        "pp2x2-interleaved-tied+fsdp": pipeline_training(ParallelConfig(pp=2, pp_virtual=2, fsdp=True), world,
                                                         n_micro=2, model=TIED),
        "pp2x2-interleaved-zb-tied+tp2": zero_bubble_training(zb("interleaved-zb", tp=2), world, n_micro=2,
                                                              model=TIED),
        "pp2x2-zbv-tied+dp2": zero_bubble_training(zb("zbv"), world, n_micro=2, model=TIED),
        "pp2x2-zbv-tied+tp2+sp+full-ac": zero_bubble_training(
            zb("zbv", tp=2, sequence_parallel=True, activation_checkpoint="full"), world, n_micro=2, model=TIED),
    }
