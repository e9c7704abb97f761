"""Worker functions for the context-parallel tests (``tests/test_context_parallel.py``).

Each runs in every process of a gloo world (``tests.distributed.run_distributed``) and
compares a context-parallel model with the single-process ``GPT`` built from the same
seed on the same rank: logits (gathered back into sequence order), the mean loss over the
whole batch, and every parameter's gradient. Returns plain data: the worst
``|a - b| / (atol + rtol * |b|)`` of each comparison (<= 1 passes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.cp import apply_context_parallel, chunk_positions, dp_cp_mesh, shard_sequence, unshard_sequence
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.parallelize import parallelize_gpt

ATOL, RTOL = 1e-6, 1e-5
SEED = 1234


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=96,
                make_vocab_size_divisible_by=8, dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = {
    "rotary-gqa": tiny(position="rotary", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                       bias=False, tie_embeddings=False),
    "learned": tiny(position="learned"),
    "sinusoidal": tiny(position="sinusoidal"),
}


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float(((got - want).abs() / (ATOL + RTOL * want.abs())).max())


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def batch(cfg: ModelConfig, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_length + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]                                           # (B, T) each


def reference(cfg: ModelConfig, tp: int) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """The single-process model's logits and loss on the whole batch (gradients kept)."""
    model = GPT(cfg, tp=tp)
    model.init_weights(seed=SEED)
    x, y = batch(cfg)
    logits = model(x)                                                              # (B, T, V)
    loss = cross_entropy(logits, y)
    loss.backward()
    return model, logits.detach(), loss.detach()


def cp_model(cfg: ModelConfig, dims: ParallelDims, mesh) -> GPT:
    """CP -> TP (+SP) -> DDP/FSDP2 on the flattened (dp, cp) mesh, as the trainer applies it."""
    model = GPT(cfg, tp=dims.tp)
    model.init_weights(seed=SEED)
    return parallelize_gpt(model, mesh, dims)


def compare(cfg: ModelConfig, dims: ParallelDims, mesh, positions: bool = True) -> dict:
    """Each data-parallel rank takes its rows of the batch, each cp rank its chunks of them.
    ``positions=False`` leaves the positions out (each rank's tokens taken as 0 .. T/cp - 1):
    a wrong model, which must fail the comparison."""
    ref, ref_logits, ref_loss = reference(cfg, dims.tp)
    model = cp_model(cfg, dims, mesh)
    cp, cp_rank = mesh["cp"].size(), mesh["cp"].get_local_rank()
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    x, y = batch(cfg)
    rows = slice(dp_rank * x.shape[0] // dp, (dp_rank + 1) * x.shape[0] // dp)
    x, y = x[rows], y[rows]                                                        # (B/dp, T)
    pos = chunk_positions(cfg.seq_length, cp, cp_rank) if positions else None
    with loss_parallel_context(dims.tp > 1):
        logits = model(shard_sequence(x, cp, cp_rank), position_ids=pos)            # (B/dp, T/cp, V)
        loss = cross_entropy(logits, shard_sequence(y, cp, cp_rank))              # this rank's mean
        loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=dp_cp_mesh(mesh).get_group())
    mean_loss /= cp * dp
    local = full(logits).detach()                                                  # (B/dp, T/cp, V)
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=mesh["cp"].get_group())
    grads = {}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grads[name] = worst(full(p.grad), ref_params[name].grad)
    return {"logits": worst(unshard_sequence(parts), ref_logits[rows]),
            "loss": worst(mean_loss, ref_loss),
            "loss_value": float(mean_loss), "ref_loss": float(ref_loss),
            "grads": max(grads.values()), "n_grads": len(grads), "n_ref": len(ref_params),
            "ref_grad_max": max(float(p.grad.abs().max()) for p in ref_params.values())}


def attention_is_swapped(mesh) -> dict:
    model = GPT(VARIANTS["learned"])
    apply_context_parallel(model, mesh["cp"])
    cores = [type(b.attention.core_attention).__name__ for b in model.layers]
    try:
        apply_context_parallel(model, mesh["cp"])
        twice = "accepted"
    except ValueError as e:
        twice = str(e)
    return {"cores": cores, "twice": twice}


def refusals(mesh, dims: ParallelDims) -> dict:
    """parallelize_gpt's messages for a cp layout given a mesh without "cp", and with compile."""
    out = {}
    for name, call in (("mesh", lambda: parallelize_gpt(GPT(VARIANTS["learned"]), mesh["dp", "tp"], dims)),
                       ("compile", lambda: parallelize_gpt(GPT(VARIANTS["learned"]), mesh, dims, compile=True))):
        try:
            call()
            out[name] = "accepted"
        except ValueError as e:  # ConfigError is a ValueError
            out[name] = str(e)
    return out


def engine_check(mesh) -> dict:
    """The trainer's engine for ``parallel.cp=2`` on 4 ranks (dp=2, ``build_engine``): each
    data-parallel rank runs two micro-batches of one sequence, against the single-process
    model on the whole batch of four."""
    import numpy as np

    from mtnlg.config import load_config
    from mtnlg.train.config import TrainRunConfig, recipe
    from mtnlg.train.engine import build_engine

    cfg = load_config(TrainRunConfig, None, ["data.path=/x", "output=/y", "parallel.tp=1", "parallel.cp=2",
                                             "model.dropout=0", "model.attention_dropout=0",
                                             "model.position=rotary", "train.micro_batch_size=1"],
                      base=recipe("debug"))
    dims = cfg.check_layout(4, paths=False)
    ref = GPT(cfg.model)
    ref.init_weights(seed=SEED)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_length + 1), generator=g)
    ref_loss = cross_entropy(ref(tokens[:, :-1]), tokens[:, 1:])
    ref_loss.backward()
    model = GPT(cfg.model)
    model.init_weights(seed=SEED)
    engine = build_engine(model, mesh, dims, cfg, torch.device("cpu"), "fp32", None)
    local = tokens[2 * dims.dp_rank(mesh):2 * dims.dp_rank(mesh) + 2].numpy().astype(np.int64)  # this dp rank's rows
    loss = engine.forward_backward(local)                                          # this rank's share
    dist.all_reduce(loss)
    ref_params = dict(ref.named_parameters())
    grads = max(worst(full(p.grad), ref_params[n].grad) for n, p in engine.model.named_parameters())
    evaluated = torch.tensor(engine.evaluate(local))                               # one per micro-batch
    dist.all_reduce(evaluated)
    return {"core": type(engine.model.layers[0].attention.core_attention).__name__,
            "loss": worst(loss / engine.loss_ranks, ref_loss), "grads": grads,
            "loss_value": float(loss / engine.loss_ranks), "ref_loss": float(ref_loss),
            "eval": worst(evaluated.mean() / engine.loss_ranks, ref_loss.detach())}


_V2 = ["model.num_layers=4", "parallel.pp_virtual=2", "train.global_batch_size=4"]  # 4 chunks, 4 micro-batches
PIPELINE_VARIANTS = {
    # 1F1B: rotary angles indexed by the rank's positions in both stages, no tied copy
    "pp2-cp2-1f1b-rotary-gqa": ["model.position=rotary", "model.num_kv_heads=2", "model.tie_embeddings=false"],
    # interleaved 1F1B: sinusoidal positions on the first chunk; the tied copy on the last rank
    "pp2-cp2-interleaved-sinusoidal-tied": ["model.position=sinusoidal", "model.tie_embeddings=true", *_V2],
    # the zero-bubble schedules: the backward split into input and weight gradients
    "pp2-cp2-interleaved-zb-rotary": ["model.position=rotary", "model.tie_embeddings=false",
                                      "parallel.pp_schedule=interleaved-zb", *_V2],
    "pp2-cp2-zbv-learned-tied": ["model.position=learned", "model.tie_embeddings=true", "parallel.pp_schedule=zbv",
                                 *_V2],
    "pp2-cp2-dualpipev-rotary-tied": ["model.position=rotary", "model.tie_embeddings=true",
                                      "parallel.pp_schedule=dualpipev", *_V2],
}
PIPELINE_STEPS = 3


def pipeline_engine_check(world: int, overrides: list[str]) -> dict:
    """The trainer's engine (``build_engine``) for ``parallel.pp=2, parallel.cp=2`` on 4 ranks
    (dp=1; micro-batches of one row, one per row of the batch) with ``overrides`` (the model,
    the schedule): ``PIPELINE_STEPS`` AdamW steps, each compared with the single-process
    model on the same rows: the mean loss, every gradient of this rank's chunks (the last
    stage's tied copy against the shared table), the norm before clipping to 1.0; and,
    before training, the evaluation loss."""
    import numpy as np

    from mtnlg.config import load_config
    from mtnlg.train.config import TrainRunConfig, recipe
    from mtnlg.train.engine import build_engine

    cfg = load_config(TrainRunConfig, None, ["data.path=/x", "output=/y", "parallel.tp=1", "parallel.pp=2",
                                             "parallel.cp=2", "model.dropout=0", "model.attention_dropout=0",
                                             "train.micro_batch_size=1", "train.global_batch_size=2",
                                             *overrides], base=recipe("debug"))
    dims = cfg.check_layout(world, paths=False)
    ref = GPT(cfg.model)
    ref.init_weights(seed=SEED)
    model = GPT(cfg.model)
    model.init_weights(seed=SEED)
    mesh = dims.build_mesh("cpu")
    engine = build_engine(model, mesh, dims, cfg, torch.device("cpu"), "fp32", None)
    # eps=1e-3 keeps AdamW's update a smooth function of the gradient. With the default 1e-8
    # its first update is lr * sign(g): where g is within float noise of zero (sums taken
    # in another order differ by about 1e-8) the two models would move by 2 * lr apart
    # and later gradients compare that noise, not context parallelism.
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)
    opt = torch.optim.AdamW(engine.model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)
    ref_params = dict(ref.named_parameters())
    names = [n.replace("_checkpoint_wrapped_module.", "") for n, _ in engine.model.named_parameters()]
    # the last stage's copy of a tied table has the gradient of the one shared weight
    ref_names = [n if n in ref_params else "tok_embeddings.weight" for n in names]
    g = torch.Generator().manual_seed(5)
    out = {"loss": 0.0, "grads": 0.0, "norm": 0.0, "losses": [], "ref_losses": [], "ref_grad_max": 0.0,
           "names": names, "pp_rank": dims.pp_rank(mesh), "cp_rank": dims.cp_rank(mesh)}
    for step in range(PIPELINE_STEPS):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1), generator=g)
        if step == 0:
            with torch.no_grad():
                ref_eval = cross_entropy(ref(tokens[:, :-1]), tokens[:, 1:])
            evaluated = torch.tensor(engine.evaluate(tokens.numpy().astype(np.int64)))
            dist.all_reduce(evaluated)
            out["eval"] = worst(evaluated / engine.loss_ranks, ref_eval)
        ref_loss = cross_entropy(ref(tokens[:, :-1]), tokens[:, 1:])
        ref_loss.backward()
        loss = engine.forward_backward(tokens.numpy().astype(np.int64))            # this rank's share
        dist.all_reduce(loss)
        loss = loss / engine.loss_ranks
        params = [p for _, p in engine.model.named_parameters()]
        grads = [worst(full(p.grad), ref_params[n].grad) for n, p in zip(ref_names, params)]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = engine.clip_grad_norm(1.0)
        out["loss"] = max(out["loss"], worst(loss, ref_loss))
        out["grads"] = max(out["grads"], *grads)
        out["norm"] = max(out["norm"], worst(full(norm), ref_norm))
        out["ref_grad_max"] = max(out["ref_grad_max"], *(float(ref_params[n].grad.abs().max()) for n in ref_names))
        out["losses"].append(float(loss))
        out["ref_losses"].append(float(ref_loss.detach()))
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["n_ref"] = len(ref_params)
    return out


def pipeline_without_positions(world: int) -> dict:
    """The 1F1B check with every stage run at positions 0 .. T/cp - 1, as if the rank's chunks
    began the sequence: a wrong model, which must fail it."""
    from mtnlg.parallel import pipeline_parallel

    original = pipeline_parallel.chunk_positions
    pipeline_parallel.chunk_positions = lambda T, cp, r, device=None: torch.arange(T // cp, device=device)
    try:
        return pipeline_engine_check(world, PIPELINE_VARIANTS["pp2-cp2-1f1b-rotary-gqa"])
    finally:
        pipeline_parallel.chunk_positions = original


def four_process_checks(rank: int, world: int) -> dict:
    """One spawn of 4 ranks. dp=2 x cp=2: DDP and FSDP2 over the 4 dp x cp ranks for rotary +
    GQA, learned and sinusoidal positions, the trainer's engine, and the model run without
    the global positions (must not match); then tp=2 + SP x cp=2 with FSDP2 (dp=1); then
    pp=2 x cp=2 (dp=1), the pipeline engine under every schedule, and once without the
    positions (must not match)."""
    torch.manual_seed(0)
    out = {}
    mesh = None
    for fsdp in (False, True):
        dims = ParallelDims.build(ParallelConfig(cp=2, fsdp=fsdp), world, VARIANTS["rotary-gqa"])
        if mesh is None:
            mesh = dims.build_mesh("cpu")
        for name, cfg in VARIANTS.items():
            if fsdp and name != "rotary-gqa":
                continue
            out[f"{name}{'-fsdp' if fsdp else ''}"] = compare(cfg, dims, mesh)
    out["rotary-no-positions"] = compare(VARIANTS["rotary-gqa"], dims, mesh, positions=False)
    out["swap"] = attention_is_swapped(mesh)
    out["refusals"] = refusals(mesh, dims)
    out["engine"] = engine_check(mesh)
    out["mesh"] = list(mesh.mesh_dim_names)
    out["dp_cp_groups"] = {"cp": mesh["cp"].mesh.tolist(), "dp": mesh["dp"].mesh.tolist()}

    cfg = VARIANTS["rotary-gqa"]
    dims = ParallelDims.build(ParallelConfig(tp=2, cp=2, sequence_parallel=True, fsdp=True), world, cfg)
    mesh = dims.build_mesh("cpu")
    out["tp-sp-cp-fsdp"] = compare(cfg, dims, mesh)
    out["tp_cp_groups"] = {"cp": mesh["cp"].mesh.tolist(), "tp": mesh["tp"].mesh.tolist()}

    # pp=2 x cp=2 (dp=1): the pipeline engine under each schedule against the single process
    for name, overrides in PIPELINE_VARIANTS.items():
        out[name] = pipeline_engine_check(world, overrides)
    out["pp2-cp2-no-positions"] = pipeline_without_positions(world)
    return out
