"""Our AdamW (Triton kernel under TRITON_INTERPRET=1, and the torch twin) against torch.optim.AdamW.

The interpreter runs the kernel at ~0.5M elements/s, so sizes stay in the thousands; they include
lengths that are not multiples of the block, several tensors per launch, and several chunks per tensor.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from evertrain.errors import EvertrainError
from evertrain.kernels.adamw import AdamW, OptimizerError, adamw_torch, adamw_triton
from evertrain.pretrain.config import ModelConfig, OptimConfig
from evertrain.pretrain.model.transformer import Transformer
from evertrain.pretrain.optim import build_optimizer, param_groups
from evertrain.pretrain.schedule import Cooldown, Schedule

SHAPES = [
    (1500,),
    (3, 5),
    (33, 64),
    (1,),
    (0, 4),
]  # 1500, 2112: not multiples of the 1024 block; an empty one
BETAS, EPS = (0.9, 0.95), 1e-8
SCHEDULE = Schedule(max_lr=1e-2, warmup_steps=10)  # warmup then rsqrt: the LR changes at every step


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch):
    """Both implementations; the Triton kernel through Triton's CPU interpreter."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture
def single_process_group():
    """A world of one (gloo, in-memory store): enough for DTensors and DeepSpeed's ZeRO."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def random_grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def two_groups(params):
    return [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (
        torch.cat([(x.detach().float() - y.detach().float()).flatten() for x, y in zip(a, b)])
        .abs()
        .max()
        .item()
    )


def test_matches_torch_adamw_over_20_steps_with_changing_lr_and_grad_scale(impl):
    ours, theirs = make_params(), make_params()
    opt = AdamW(two_groups(ours), SCHEDULE, betas=BETAS, eps=EPS, impl=impl)
    ref = torch.optim.AdamW(two_groups(theirs), lr=0.0, betas=BETAS, eps=EPS)
    assert opt.impl == impl
    lrs = []
    for step in range(1, 21):
        grads = random_grads(ours, step)
        scale = torch.tensor([1.0 - 0.04 * step])  # a clip coefficient, changing every step
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g * scale
        opt.grad_scale = scale
        opt.step()
        lrs.append(opt.lr.item())
        for group in ref.param_groups:
            group["lr"] = lrs[-1]
        ref.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads))  # gradients left as they were
    assert opt.step_count.item() == 20 and len(set(lrs)) == 20
    assert max_abs_diff(ours, theirs) <= 1e-6
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_abs_diff([opt.state[p][key] for p in ours], [ref.state[q][key] for q in theirs]) <= 1e-6


@pytest.mark.parametrize("scale", [1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize("path", ["torch", "aligned", "unaligned"])
def test_matches_torch_adamw_where_eps_matters(path, scale, monkeypatch):
    """Gradients of 1e-4..1e-8 against eps = 1e-8: sqrt(v) is near eps, so where eps enters shows
    (torch adds it after the bias correction of sqrt(v); before it, eps is 4.5x larger at step 1 and the
    update ~3e-3 off at 1e-8, ~4e-6 at 1e-4). The kernel through its aligned and unaligned access paths."""
    shapes = [(1296,), (80,), (528,)]  # multiples of 16 (else no aligned path), tails shorter than the block
    params = make_params(shapes=shapes)
    theirs = [nn.Parameter(p.detach().flatten().clone()) for p in params]
    ref = torch.optim.AdamW(theirs, lr=0.0, betas=BETAS, eps=EPS, weight_decay=0.1)
    zeros = [torch.zeros(s).flatten() for s in shapes]
    if path == "torch":
        ours, ours_m, ours_v = (
            [p.detach().flatten().clone() for p in params],
            zeros,
            [z.clone() for z in zeros],
        )
        update = adamw_torch
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        offset = 0 if path == "aligned" else 1
        ours = views_into_one_buffer(params, offset)
        ours_m, ours_v = views_into_one_buffer(zeros, offset), views_into_one_buffer(zeros, offset)
        cache = {}

        def update(*args, **kwargs):
            adamw_triton(*args, chunk=512, block=128, cache=cache, **kwargs)

    for step in range(1, 6):
        grads = [scale * g.flatten() for g in random_grads(params, step)]
        lr = 1e-2 * step / 5
        update(
            ours,
            grads,
            ours_m,
            ours_v,
            [0.1] * len(shapes),
            lr=torch.tensor([lr]),
            step=torch.tensor(step),
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
        )
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        ref.param_groups[0]["lr"] = lr
        ref.step()
    if path != "torch":
        ((_, tables),) = cache.values()
        assert tables[3] == (path == "aligned")  # the access path the test names
    assert max_abs_diff(ours, theirs) <= 1e-6, (
        f"the update differs from torch's AdamW at gradients of {scale:g}"
    )
    for key, mine in (("exp_avg", ours_m), ("exp_avg_sq", ours_v)):
        reference = [ref.state[q][key] for q in theirs]
        size = max(t.abs().max().item() for t in reference)
        assert max_abs_diff(mine, reference) <= 1e-5 * size, key


def views_into_one_buffer(tensors, offset: int) -> list[torch.Tensor]:
    """Copies of `tensors` living in one flat buffer from element `offset` on, like ZeRO's partitions."""
    flat = torch.zeros(offset + sum(t.numel() for t in tensors))
    views = torch.split(flat[offset:], [t.numel() for t in tensors])
    for view, t in zip(views, tensors):
        view.copy_(t.detach().flatten())
    return list(views)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("offset", [0, 1])  # 0: the vector-access path; 1: pointers only 4-byte aligned
def test_kernel_spreads_tensors_over_several_chunks_in_one_launch(offset):
    shapes = [(1296,), (80,), (512,), (1040,)]  # with chunk=512: 3 + 1 + 1 + 3 programs; tails < block
    params = make_params(shapes=shapes)
    ours, theirs = views_into_one_buffer(params, offset), [p.detach().flatten().clone() for p in params]
    zeros = [torch.zeros(s).flatten() for s in shapes]
    ours_m, ours_v = views_into_one_buffer(zeros, offset), views_into_one_buffer(zeros, offset)
    theirs_m, theirs_v = [z.clone() for z in zeros], [z.clone() for z in zeros]
    decays, cache = [0.1, 0.0, 0.3, 0.1], {}
    for step in range(1, 4):
        grads = [g.flatten() for g in random_grads(params, step)]
        kwargs = dict(lr=torch.tensor([3e-3 * step]), step=torch.tensor(step), beta1=0.8, beta2=0.99, eps=EPS)
        adamw_triton(ours, grads, ours_m, ours_v, decays, chunk=512, block=128, cache=cache, **kwargs)
        adamw_torch(theirs, grads, theirs_m, theirs_v, decays, **kwargs)
    ((key, tables),) = cache.values()
    assert tables[2].shape == (8, 2) and tables[3] == (offset == 0)  # 8 chunks; aligned unless offset
    assert max_abs_diff(ours, theirs) <= 1e-6
    assert max_abs_diff(ours_m + ours_v, theirs_m + theirs_v) <= 1e-6
    # unchanged tensors reuse the uploaded tables; a new gradient tensor rebuilds them
    adamw_triton(ours, grads, ours_m, ours_v, decays, chunk=512, block=128, cache=cache, **kwargs)
    assert next(iter(cache.values()))[1] is tables
    adamw_triton(
        ours, [g.clone() for g in grads], ours_m, ours_v, decays, chunk=512, block=128, cache=cache, **kwargs
    )
    assert next(iter(cache.values()))[1] is not tables


def test_bf16_params_with_fp32_moments_are_updated_in_fp32_and_rounded_once(impl):
    params = make_params(torch.bfloat16)
    master = [p.detach().float() for p in params]  # what one fp32 update of the same values gives
    opt = AdamW(two_groups(params), SCHEDULE, betas=BETAS, eps=EPS, impl=impl)
    grads = random_grads(params, 1)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    m32, v32 = [torch.zeros_like(m) for m in master], [torch.zeros_like(m) for m in master]
    adamw_torch(
        master,
        [g.float() for g in grads],
        m32,
        v32,
        [0.1, 0.0] * 2 + [0.1],
        lr=opt.lr,
        step=opt.step_count,
        beta1=BETAS[0],
        beta2=BETAS[1],
        eps=EPS,
    )
    for p, want in zip(params, master):
        assert p.dtype == torch.bfloat16
        # within one bf16 spacing (2^-7 relative) of the fp32 result: rounded once, not per op
        assert ((p.float() - want).abs() <= want.abs() * 2**-7 + 1e-30).all()
        assert (
            opt.state[p]["exp_avg"].dtype == torch.float32
            and opt.state[p]["exp_avg_sq"].dtype == torch.float32
        )
    assert max_abs_diff([opt.state[p]["exp_avg"] for p in params], m32) <= 1e-7
    assert max_abs_diff([opt.state[p]["exp_avg_sq"] for p in params], v32) <= 1e-7


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_kernel_compiles_for_sm90_with_128_bit_accesses_when_aligned(monkeypatch, tmp_path, param_dtype):
    """The compiled kernel (not the interpreter), built for an H100/H200 without a GPU: Triton's
    frontend accepts it, and when the host vouches for alignment, p, g, m, v move as 128-bit vectors."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from evertrain.kernels import adamw as adamw_module

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton.jit picks compiler vs interpreter
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton.jit(adamw_module._adamw_kernel)
    pointers = dict(
        tensor_table="*i64",
        weight_decays="*fp32",
        chunk_table="*i64",
        lr_ptr="*fp32",
        step_ptr="*i64",
        grad_scale_ptr="*fp32",
        found_inf_ptr="*fp32",
    )
    signature = {
        **pointers,
        "beta1": "fp32",
        "beta2": "fp32",
        "eps": "fp32",
        **{
            name: "constexpr"
            for name in (
                "PARAM_DTYPE",
                "GRAD_DTYPE",
                "HAS_GRAD_SCALE",
                "HAS_FOUND_INF",
                "ALIGNED",
                "CHUNK",
                "BLOCK",
            )
        },
    }
    aligned_args = {
        (i,): [["tt.divisibility", 16]] for i in range(len(pointers))
    }  # as Triton's launcher does
    for aligned in (True, False):
        constants = dict(
            PARAM_DTYPE=getattr(tl, param_dtype),
            GRAD_DTYPE=getattr(tl, param_dtype),
            HAS_GRAD_SCALE=True,
            HAS_FOUND_INF=True,
            ALIGNED=aligned,
            CHUNK=adamw_module.CHUNK,
            BLOCK=adamw_module.BLOCK,
        )
        compiled = triton.compile(
            ASTSource(kernel, signature, constants, aligned_args),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4},
        )
        ptx = compiled.asm["ptx"]
        assert ("st.global.v4.b32" in ptx) == aligned
        assert ("ld.global.v4.b32" in ptx) == aligned


def test_bf16_moments_stay_fp32_through_a_state_dict_round_trip():
    params = make_params(torch.bfloat16)
    opt = AdamW(two_groups(params), SCHEDULE)
    for p, g in zip(params, random_grads(params, 1)):
        p.grad = g
    opt.step()
    fresh = AdamW(two_groups(params), SCHEDULE)
    fresh.load_state_dict(opt.state_dict())
    for p in params:
        assert set(fresh.state[p]) == {"exp_avg", "exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_one_step_per_training_step_when_called_per_param_group():
    """DeepSpeed's ZeRO 1/2 call step() once per param group with param_groups narrowed to it."""
    ours, theirs = make_params(), make_params()
    opt = AdamW(two_groups(ours), SCHEDULE)
    plain = AdamW(two_groups(theirs), SCHEDULE)
    groups = opt.param_groups
    for step in range(1, 4):
        for p, q, g in zip(ours, theirs, random_grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        for group in groups:
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = groups
        plain.step()
        assert opt.step_count.item() == step
    assert max_abs_diff(ours, theirs) == 0.0


def test_deepspeed_zero2_client_optimizer(single_process_group, monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ref = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    opt = AdamW(param_groups(model, 0.1), SCHEDULE, betas=BETAS)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        },
    )
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=0.0, betas=BETAS)
    x = torch.randn(4, 8)
    for _ in range(4):
        engine.backward(engine(x).square().mean())
        engine.step()
        ref(x).square().mean().backward()
        for group in ref_opt.param_groups:
            group["lr"] = opt.lr.item()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.step_count.item() == 4  # ZeRO stepped each of the two groups separately
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)  # what DeepSpeed logs
    flat = opt.param_groups[0]["params"][0]  # ZeRO's flat fp32 partition
    assert set(opt.state[flat]) == {"exp_avg", "exp_avg_sq"}
    assert max_abs_diff(list(model.parameters()), list(ref.parameters())) <= 1e-6


def test_fsdp2_dtensor_params_update_their_local_shard(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    ref = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = AdamW(param_groups(model, 0.1), SCHEDULE, betas=BETAS)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=0.0, betas=BETAS)
    x = torch.randn(4, 8)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ref(x).square().mean().backward()
        for group in ref_opt.param_groups:
            group["lr"] = opt.lr.item()
        ref_opt.step()
        ref_opt.zero_grad()
    p = next(model.parameters())
    assert isinstance(p, DTensor) and isinstance(opt.state[p]["exp_avg"], DTensor)
    assert max_abs_diff([q.full_tensor() for q in model.parameters()], list(ref.parameters())) <= 1e-6


def test_set_step_resumes_the_schedule():
    params = make_params()
    opt = AdamW(params, SCHEDULE)
    opt.set_step(1000)
    assert opt.step_count.item() == 1000 and opt.lr.item() == SCHEDULE(torch.tensor(1000)).item()
    for p, g in zip(params, random_grads(params, 1)):
        p.grad = g
    opt.step()
    assert opt.step_count.item() == 1001 and opt.lr.item() == SCHEDULE(torch.tensor(1001)).item()
    with pytest.raises(OptimizerError, match="set_step"):
        opt.set_step(-1)


def test_a_step_without_gradients_changes_nothing():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = AdamW(params, SCHEDULE)
    opt.step()
    assert opt.step_count.item() == 0 and not opt.state and max_abs_diff(params, before) == 0.0


def test_no_host_sync_in_50_schedule_and_optimizer_steps(monkeypatch):
    """Reading any device value on the host would be one of these calls."""
    schedule = Schedule(1e-2, 10, cooldown=Cooldown(30, 15, "1-sqrt"))
    params = make_params()
    opt = AdamW(two_groups(params), schedule, impl="torch")
    grads = [random_grads(params, step) for step in range(2)]
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    torch.zeros(1).item()
    assert calls == ["item"]  # the counter sees host reads
    calls.clear()
    for step in range(50):
        for p, g in zip(params, grads[step % 2]):
            p.grad = g
        opt.grad_scale = torch.clamp(
            1.0 / (torch.stack([g.norm() for g in grads[step % 2]]).norm() + 1e-6), max=1.0
        ).reshape(1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    monkeypatch.undo()
    assert calls == []
    assert opt.step_count.item() == 50 and opt.lr.item() == 0.0  # the cooldown ended at step 45


def test_auto_picks_the_torch_twin_without_cuda(interpret):
    assert AdamW(make_params(), SCHEDULE).impl == "torch"  # never the slow interpreter by itself


def test_triton_without_cuda_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(OptimizerError, match="TRITON_INTERPRET=1"):
        AdamW(make_params(), SCHEDULE, impl="triton")


class NanSchedule:
    max_lr = float("nan")

    def __call__(self, step):
        return torch.full_like(step, float("nan"), dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(betas=(1.0, 0.95)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(impl="cuda"), "optim.impl"),
        (dict(schedule=NanSchedule()), "max_lr"),
        (dict(schedule=1e-3), "schedule"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    kwargs.setdefault("schedule", SCHEDULE)
    with pytest.raises(OptimizerError, match=match) as info:
        AdamW(make_params(), **kwargs)
    assert isinstance(info.value, EvertrainError) and "\n" not in str(info.value)


def test_non_finite_max_lr_cannot_reach_the_optimizer():
    with pytest.raises(EvertrainError, match="max_lr"):
        AdamW(make_params(), Schedule(float("inf"), 10))


def test_sparse_gradients_are_an_error_before_anything_is_written():
    embedding, dense = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)
    params = [dense.weight, embedding.weight]
    before = [p.detach().clone() for p in params]
    opt = AdamW(params, SCHEDULE)
    dense(embedding(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(OptimizerError, match="sparse"):
        opt.step()
    assert max_abs_diff(params, before) == 0.0 and opt.step_count.item() == 0


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizer_decays_matrices_but_not_norms_biases_or_embeddings(tie):
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, seq_len=8, tie_embeddings=tie)
    )
    opt = build_optimizer(model, OptimConfig(max_lr=1e-3, weight_decay=0.1), SCHEDULE)
    decayed, undecayed = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [SCHEDULE.max_lr] * 2
    assert id(model.embed_tokens.weight) in undecayed and id(model.norm.weight) in undecayed
    assert id(model.layers[0].mlp.up_proj.weight) in decayed
    assert (id(model.lm_head.weight) in decayed) == (not tie)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))  # a tied tensor appears once
