"""Per-process bodies of the parallel equivalence tests (run by ``tests/distributed.py``).

Each rank builds the single-process reference model itself (same seed, same batch: it is
tiny) next to the parallel one, so every comparison is local; results come back as plain
numbers and the pytest side applies the tolerances. Tolerances are expressed as the
``torch.testing.assert_close`` criterion |a - b| <= atol + rtol * |b|; a check reports
``worst``, the largest ratio of the two sides (<= 1 passes), and ``max_abs``.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.parallelize import parallelize_gpt
from mtnlg.parallel.utils import clip_grad_norm_, set_requires_gradient_sync, set_seed_for_rank

TINY = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=300,
            make_vocab_size_divisible_by=8)
VARIANTS = {
    "learned": {},
    "sinusoidal": {"position": "sinusoidal"},
    "rotary": {"position": "rotary"},
    "llama": {"position": "rotary", "norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 2,
              "tie_embeddings": False, "bias": False},
}
LOGITS_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
BATCH = 4
STEPS = 3
MAX_NORM = 1.0  # below the first steps' gradient norm (~1.7), so clipping is exercised


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def closeness(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> dict:
    diff = (got.detach() - want.detach()).abs()
    return {"worst": float((diff / (atol + rtol * want.detach().abs())).max()),
            "max_abs": float(diff.max())}


def merge(*checks: dict) -> dict:
    return {"worst": max(c["worst"] for c in checks), "max_abs": max(c["max_abs"] for c in checks)}


def tokens_for_step(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, TINY["vocab_size"], (BATCH, TINY["seq_length"] + 1), generator=g)


_MESHES: dict = {}


def mesh_for(dims: ParallelDims):
    """One mesh per shape: each new mesh creates process groups, which takes time."""
    if (dims.dp, dims.tp) not in _MESHES:
        _MESHES[(dims.dp, dims.tp)] = dims.build_mesh("cpu")
    return _MESHES[(dims.dp, dims.tp)]


def build(cfg: ModelConfig, pc: ParallelConfig, world: int):
    """(reference GPT, parallel GPT, mesh, dims), both models from the same seed."""
    dims = ParallelDims.build(pc, world, cfg)
    mesh = mesh_for(dims)
    set_seed_for_rank(0)
    ref = GPT(cfg, tp=dims.tp)
    model = parallelize_gpt(copy.deepcopy(ref), mesh, dims, activation_checkpoint=pc.activation_checkpoint,
                            compile=pc.compile)
    return ref, model, mesh, dims


def local_rows(x: torch.Tensor, mesh, dims: ParallelDims) -> torch.Tensor:
    """This data-parallel rank's contiguous slice of the global batch."""
    b = x.shape[0] // dims.dp
    r = dims.dp_rank(mesh)
    return x[r * b:(r + 1) * b]


def forward_backward(model, tokens, mesh, dims):
    x, y = local_rows(tokens[:, :-1], mesh, dims), local_rows(tokens[:, 1:], mesh, dims)
    with loss_parallel_context(dims.tp > 1):
        logits = model(x)
        loss = cross_entropy(logits, y)
        loss.backward()
    return logits, loss


def grad_check(ref, model) -> dict:
    """Every parameter's (gathered) gradient against the reference's; also how large the
    reference gradients are, so a vacuous comparison would show."""
    ref_params = dict(ref.named_parameters())
    checks, names = [], set()
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        names.add(name)
        checks.append(closeness(full(p.grad), ref_params[name].grad, **GRAD_TOL))
    out = merge(*checks)
    out["same_names"] = names == set(ref_params)
    out["ref_grad_max"] = max(float(p.grad.abs().max()) for p in ref.parameters())
    return out


def equivalence(cfg: ModelConfig, pc: ParallelConfig, world: int, train: bool = False) -> dict:
    """One forward/backward of the parallel model vs the reference on the global batch."""
    ref, model, mesh, dims = build(cfg, pc, world)
    ref.train(train)
    model.train(train)
    tokens = tokens_for_step(0)
    torch.manual_seed(7)  # dropout draws, identical on every rank and in the reference
    ref_logits = ref(tokens[:, :-1])
    ref_loss = cross_entropy(ref_logits, tokens[:, 1:])
    ref_loss.backward()
    torch.manual_seed(7)
    logits, loss = forward_backward(model, tokens, mesh, dims)
    out = grad_check(ref, model)
    out["logits"] = closeness(full(logits), local_rows(ref_logits, mesh, dims), **LOGITS_TOL)
    out["logits_is_vocab_sharded"] = (isinstance(logits, DTensor)
                                      and logits.placements[-1].is_shard(logits.ndim - 1)
                                      ) if dims.tp > 1 else None
    return out


def accumulation(cfg: ModelConfig, pc: ParallelConfig, world: int, micro: int = 2, every: bool = False) -> dict:
    """Gradient accumulation over ``micro`` micro-batches with the data-parallel reduction
    switched off for all but the last (or, ``every``, on for each: FSDP's
    ``fsdp_grad_sync=micro_batch``) gives the full-batch reference gradients. Also whether,
    after the first micro-batch, every gradient is already a sharded DTensor of this rank's
    share (nothing unsharded kept)."""
    ref, model, mesh, dims = build(cfg, pc, world)
    tokens = tokens_for_step(0)
    cross_entropy(ref(tokens[:, :-1]), tokens[:, 1:]).backward()
    rows = local_rows(tokens, mesh, dims)
    sharded_after_first = None
    for i, chunk in enumerate(rows.chunk(micro)):
        set_requires_gradient_sync(model, every or i == micro - 1)
        with loss_parallel_context(dims.tp > 1):
            loss = cross_entropy(model(chunk[:, :-1]), chunk[:, 1:]) / micro
            loss.backward()
        if i == 0:
            grads = [p.grad for p in model.parameters()]
            sharded_after_first = all(isinstance(g, DTensor) and g.to_local().numel() < g.numel()
                                      for g, p in zip(grads, model.parameters()) if p.numel() >= dims.dp * 8)
    out = grad_check(ref, model)
    out["sharded_after_first"] = sharded_after_first
    return out


def training(cfg: ModelConfig, pc: ParallelConfig | None, world: int) -> dict:
    """Losses and clipped grad norms of STEPS AdamW steps; ``pc=None`` = single process."""
    if pc is None:
        set_seed_for_rank(0)
        model, mesh, dims = GPT(cfg), None, None
    else:
        _, model, mesh, dims = build(cfg, pc, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        tokens = tokens_for_step(step)
        if dims is None:
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        else:
            _, loss = forward_backward(model, tokens, mesh, dims)
            norm = float(clip_grad_norm_(model.parameters(), MAX_NORM))
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=mesh["dp"].get_group())  # mean over dp ranks
            loss /= dims.dp
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm)
    return {"losses": losses, "grad_norms": norms}


def rng_states_equal_across_ranks() -> bool:
    state = torch.get_rng_state().to(torch.int64)
    gathered = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, state)
    return all(torch.equal(g, state) for g in gathered)


def same_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def observe_dropouts(model) -> dict:
    """Which of a TP model's dropouts draw the same masks on every rank, whether the shared
    generator stays in step, and that eval mode draws nothing."""
    model.train()
    layer = model.layers[0]
    torch.manual_seed(3)
    q = torch.randn(2, 8, 2, 16)  # identical on every rank: (B, T, nh_local, hd)
    out = {
        "core_type": type(layer.attention.core_attention).__name__,
        "core_attention_same": same_across_ranks(layer.attention.core_attention(q, q, q)),
        "mlp_dropout_same": same_across_ranks(layer.mlp.dropout(torch.ones(64, 64))),
        "embedding_dropout_same": same_across_ranks(model.drop(torch.ones(64, 64))),
        "rng_in_step_after": rng_states_equal_across_ranks(),
    }
    layer.eval()
    before = torch.get_rng_state()
    y_eval = layer.attention.core_attention(q, q, q)
    out["eval_draws_nothing"] = bool(torch.equal(before, torch.get_rng_state()))
    out["eval_same"] = same_across_ranks(y_eval)
    return out


def dropout_behaviour(world: int) -> dict:
    """Where each dropout draws from, observed directly on the parallel model's modules."""
    cfg = tiny(dropout=0.5, attention_dropout=0.5)
    return {f"sp={sp}": observe_dropouts(build(cfg, ParallelConfig(tp=world, sequence_parallel=sp), world)[1])
            for sp in (False, True)}


def recomputed_grad_diffs(make_model) -> dict:
    """Largest gradient difference of "full"/"selective" recomputation against none, dropout
    on: ``make_model(mode)`` -> (model, mesh, dims)."""
    grads = {}
    for mode in ("none", "full", "selective"):
        model, mesh, dims = make_model(mode)
        model.train()
        torch.manual_seed(11)
        forward_backward(model, tokens_for_step(0), mesh, dims)
        grads[mode] = {n.replace("_checkpoint_wrapped_module.", ""): full(p.grad).clone()
                       for n, p in model.named_parameters()}
    return {mode: max(float((grads[mode][n] - g).abs().max()) for n, g in grads["none"].items())
            for mode in ("full", "selective")}


def checkpointing_with_dropout(world: int) -> dict:
    """Gradients with "full"/"selective" recomputation equal those without, dropout on."""
    cfg = tiny(dropout=0.1, attention_dropout=0.1)
    return recomputed_grad_diffs(lambda mode: build(cfg, ParallelConfig(
        tp=world, sequence_parallel=True, activation_checkpoint=mode), world)[1:])


def _counter_model(cfg: ModelConfig, world: int, sp: bool, ac: str = "none"):
    """A TP model whose per-rank dropouts are the counter-based ones (``rng="counter"``,
    what ``parallel.compile`` selects), left eager so that SP and recomputation can be
    checked on CPU (where SP does not compile)."""
    from mtnlg.parallel.parallelize import apply_activation_checkpointing
    from mtnlg.parallel.tensor_parallel import apply_tensor_parallel

    pc = ParallelConfig(tp=world, sequence_parallel=sp, activation_checkpoint=ac)
    dims = ParallelDims.build(pc, world, cfg)
    mesh = mesh_for(dims)
    set_seed_for_rank(0)
    model = GPT(cfg, tp=world)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp, rng="counter")
    apply_activation_checkpointing(model, ac)
    return model, mesh, dims


def counter_rng_checks(world: int) -> dict:
    """The compile-friendly per-rank dropout: where masks agree, the keep rate, replay
    under recomputation, and graph breaks of compiled TP blocks with dropout on."""
    from mtnlg.parallel.utils import counter_keep_mask

    out: dict = {f"sp={sp}": observe_dropouts(_counter_model(tiny(dropout=0.5, attention_dropout=0.5), world, sp)[0])
                 for sp in (False, True)}
    torch.manual_seed(5)
    a = counter_keep_mask((1000, 1000), 0.1, 1, "cpu")
    torch.manual_seed(5)
    b = counter_keep_mask((1000, 1000), 0.1, 2, "cpu")
    out["keep_rate"] = float(a.float().mean())
    out["agreement_other_salt"] = float((a == b).float().mean())  # 0.82 if independent
    # recomputation replays the masks: gradients equal bitwise with and without it
    cfg = tiny(dropout=0.1, attention_dropout=0.1)
    out["checkpointing"] = recomputed_grad_diffs(lambda mode: _counter_model(cfg, world, True, mode))
    out["compiled"] = {rng: compiled_steps(world, rng) for rng in ("counter", "fork")}
    out["compiled"]["counter-eager"] = compiled_steps(world, "counter", compiled=False)
    return out


def compiled_steps(world: int, rng: str, compiled: bool = True) -> dict:
    """Three training forward/backward passes of a TP model with dropout 0.1, its blocks
    compiled as ``parallel.compile`` does (``aot_eager`` backend: Dynamo and AOT autograd
    trace the same graphs as with inductor, without the C++ compilation): Dynamo's graph
    breaks and graphs. ``rng="fork"`` is the eager path's hooks, for contrast."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from mtnlg.parallel.tensor_parallel import apply_tensor_parallel

    cfg = tiny(dropout=0.1, attention_dropout=0.1)
    dims = ParallelDims.build(ParallelConfig(tp=world), world, cfg)
    mesh = mesh_for(dims)
    set_seed_for_rank(0)
    model = GPT(cfg, tp=world)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=False, rng=rng)
    torch._dynamo.reset()
    counters.clear()
    if compiled:
        for block in model.layers.children():
            block.compile(backend="aot_eager")
    model.train()
    losses = []
    for step in range(STEPS):
        torch.manual_seed(20 + step)
        _, loss = forward_backward(model, tokens_for_step(step), mesh, dims)
        losses.append(float(loss.detach()))
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "reasons": sorted(r.splitlines()[0] for r in counters["graph_break"])[:3],
            "graphs": counters["stats"].get("unique_graphs", 0),
            "losses": losses, "finite": all(x == x and abs(x) < 1e9 for x in losses)}


def errors(world: int) -> dict:
    """Messages of layouts that must be refused after the process group exists."""
    out = {}
    cfg = tiny(vocab_size=301, make_vocab_size_divisible_by=1)
    pc = ParallelConfig(tp=world)
    dims = ParallelDims.build(pc, world, cfg)
    mesh = mesh_for(dims)
    try:
        parallelize_gpt(GPT(cfg, tp=1), mesh, dims)  # padded for tp=1: 301 rows
    except Exception as e:  # noqa: BLE001 - the message is the result
        out["vocab"] = f"{type(e).__name__}: {e}"
    try:
        sp = ParallelDims.build(ParallelConfig(tp=world, sequence_parallel=True), world, tiny())
        parallelize_gpt(GPT(tiny(), tp=world), mesh, sp, compile=True)
    except Exception as e:  # noqa: BLE001
        out["compile+sp"] = f"{type(e).__name__}: {e}"
    from torch.distributed.device_mesh import init_device_mesh
    try:
        parallelize_gpt(GPT(tiny()), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), dims)
    except Exception as e:  # noqa: BLE001
        out["mesh"] = f"{type(e).__name__}: {e}"
    return out


# ---- the spawned bodies ------------------------------------------------------------------

def two_process_checks(rank: int, world: int) -> dict:
    res: dict = {"tp": {}, "dp": {}, "train": {}}
    for name, kw in VARIANTS.items():
        for sp in (False, True):
            res["tp"][f"{name}/sp={sp}"] = equivalence(
                tiny(**kw), ParallelConfig(tp=2, sequence_parallel=sp), world)
    # replicated-region dropout draws the same masks as the single-process model
    res["tp"]["learned/dropout-train"] = equivalence(
        tiny(dropout=0.2), ParallelConfig(tp=2), world, train=True)
    for name, kw in (("learned", {}), ("llama", VARIANTS["llama"])):
        for fsdp in (False, True):
            res["dp"][f"{name}/{'fsdp' if fsdp else 'ddp'}"] = equivalence(
                tiny(**kw), ParallelConfig(fsdp=fsdp), world)
    for fsdp in (False, True):
        res["dp"][f"learned/{'fsdp' if fsdp else 'ddp'}/accumulate"] = accumulation(
            tiny(), ParallelConfig(fsdp=fsdp), world)
    res["dp"]["learned/fsdp/accumulate-sync-each"] = accumulation(tiny(), ParallelConfig(fsdp=True), world,
                                                                  every=True)
    layouts = {
        "single": None,
        "tp2": ParallelConfig(tp=2),
        "tp2+sp": ParallelConfig(tp=2, sequence_parallel=True),
        "tp2+full-ac": ParallelConfig(tp=2, activation_checkpoint="full"),
        "dp2": ParallelConfig(),
        "dp2-fsdp": ParallelConfig(fsdp=True),
        "dp2-fsdp+selective-ac": ParallelConfig(fsdp=True, activation_checkpoint="selective"),
    }
    for name, pc in layouts.items():
        res["train"][name] = training(tiny(), pc, world)
    res["dropout"] = dropout_behaviour(world)
    res["checkpointing"] = checkpointing_with_dropout(world)
    res["counter_rng"] = counter_rng_checks(world)
    res["errors"] = errors(world)
    return res


def four_process_checks(rank: int, world: int) -> dict:
    res: dict = {"tpxdp": {}, "train": {}}
    cases = {
        "ddp/learned": (tiny(), ParallelConfig(tp=2)),
        "ddp/llama+sp": (tiny(**VARIANTS["llama"]), ParallelConfig(tp=2, sequence_parallel=True)),
        "fsdp/learned": (tiny(), ParallelConfig(tp=2, fsdp=True)),
        "fsdp/llama+sp": (tiny(**VARIANTS["llama"]),
                          ParallelConfig(tp=2, fsdp=True, sequence_parallel=True)),
    }
    for name, (cfg, pc) in cases.items():
        res["tpxdp"][name] = equivalence(cfg, pc, world)
    res["train"]["single"] = training(tiny(), None, world)
    res["train"]["tp2xdp2"] = training(tiny(), ParallelConfig(tp=2), world)
    res["train"]["tp2xdp2-fsdp+sp+full-ac"] = training(
        tiny(), ParallelConfig(tp=2, fsdp=True, sequence_parallel=True,
                               activation_checkpoint="full"), world)
    res["rank_layout"] = mesh_for(ParallelDims.build(ParallelConfig(tp=2), world, tiny())).mesh.tolist()
    return res
