"""Compressed gradient communication (quest_pl.comm) on 2 gloo ranks: packing, unbiasedness of each compressor,
lower variance of correlated than independent rounding, MARINA's exact full steps, DDP training with the hook."""

import gc
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quest_pl import comm

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn_name: str, out: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = globals()[fn_name](rank, **kwargs)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        gc.collect()  # DDP reducers and pending hook futures go before the process group they reference
        dist.destroy_process_group()


def run_ranks(fn_name: str, **kwargs):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(_worker, args=(_free_port(), fn_name, out, kwargs), nprocs=WORLD, join=True)
        return torch.load(out, weights_only=False)


def _inputs(rank: int, n: int) -> torch.Tensor:
    """Rank-specific fixed gradients (the same on every call)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


N, DRAWS, CHUNK, MARINA_STEPS = 256, 400, 256, 200


def _draws(rank: int) -> dict:
    """For each (hook, bits): DRAWS compressed means of fixed rank-specific inputs, and the exact mean."""
    x = _inputs(rank, N)
    exact = x.clone()
    dist.all_reduce(exact)
    out = {"exact": exact / WORLD, "range": exact.new_tensor(0.0)}
    rng = x.abs().max()
    dist.all_reduce(rng, op=dist.ReduceOp.MAX)
    out["range"] = rng
    for hook in ("quantized", "correlated"):
        for bits in (2, 4):
            state = comm.CompressionState(hook=hook, bits=bits, chunk=CHUNK, seed=7)
            means = []
            for _ in range(DRAWS):
                means.append(comm.compressed_mean(state, x))
                state.step += 1
            out[hook, bits] = torch.stack(means)
    marina = comm.CompressionState(hook="correlated", bits=2, chunk=64, seed=1, marina_p=1.0)
    out["marina_full"] = comm.marina_mean(marina, x, key=0)
    sent = comm.CompressionState(hook="correlated", bits=4, chunk=CHUNK, seed=2, marina_p=0.5)
    steps = []
    for _ in range(MARINA_STEPS):
        comm.compressed_allreduce_hook(sent, _Bucket(x))
        steps.append(sent.last_step_bytes)
    out["marina_bytes"] = steps
    return out


class _Bucket:
    """The part of DDP's GradBucket the hook reads: one bucket holding the whole gradient."""

    def __init__(self, g: torch.Tensor):
        self.g = g

    def buffer(self) -> torch.Tensor:
        return self.g

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


@pytest.fixture(scope="module")
def draws():
    return run_ranks("_draws")


@pytest.mark.parametrize("bits", comm.BITS)
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = comm.pack_codes(codes, bits)
    assert packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(comm.unpack_codes(packed, bits, 1001).to(torch.uint8), codes)


@pytest.mark.parametrize("hook", ["quantized", "correlated"])
@pytest.mark.parametrize("bits", [2, 4])
def test_compressor_is_unbiased(draws, hook, bits):
    """The mean over K draws equals the exact mean within 5 standard errors: a rank's rounding error is bounded by
    one level spacing D (variance <= D^2 / 4), so the mean of n ranks has variance <= D^2 / (4 n) per draw."""
    means, exact = draws[hook, bits], draws["exact"]
    spacing = 2 * float(draws["range"]) / (2**bits - 1)
    bound = 5 * (spacing / 2) / math.sqrt(WORLD * DRAWS)
    assert (means.mean(0) - exact).abs().max() < bound
    # every single draw is within one level of the exact mean (each rank rounds to a neighbouring level)
    assert (means - exact).abs().max() <= spacing + 1e-5


@pytest.mark.parametrize("bits", [2, 4])
def test_correlated_rounding_has_lower_variance(draws, bits):
    """The point of correlated quantizers: at equal bits the averaged gradient's variance is lower."""
    var = {hook: (draws[hook, bits] - draws["exact"]).square().mean().item() for hook in ("quantized", "correlated")}
    assert var["correlated"] < 0.8 * var["quantized"], var


def test_marina_full_exchange_is_the_exact_mean(draws):
    torch.testing.assert_close(draws["marina_full"], draws["exact"])


VARIANTS = [("none", 1.0), ("fp16", 1.0), ("quantized", 1.0), ("correlated", 1.0), ("correlated", 0.2)]


def _train_all(rank: int, steps: int) -> dict:
    return {v: _train(rank, *v, steps=steps) for v in VARIANTS}


def _train(rank: int, hook: str, marina_p: float, steps: int) -> dict:
    """A small regression MLP with DDP; each rank sees its own stream of data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    comm.register(ddp, hook, bits=4, chunk=128, seed=3, marina_p=marina_p)
    gen = torch.Generator().manual_seed(rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(42))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        loss = (ddp(x) - x @ w_true).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(WORLD)]
    dist.all_gather(gathered, params)
    del ddp, opt
    return {"losses": losses, "same_on_ranks": bool(torch.equal(gathered[0], gathered[1]))}


@pytest.fixture(scope="module")
def trained():
    return run_ranks("_train_all", steps=150)


@pytest.mark.parametrize(("hook", "marina_p"), VARIANTS)
def test_ddp_training_with_hook_converges(trained, hook, marina_p):
    r = trained[hook, marina_p]
    first, last = sum(r["losses"][:10]) / 10, sum(r["losses"][-10:]) / 10
    assert last < 0.1 * first, (first, last)
    assert r["same_on_ranks"]  # every rank applied the same averaged gradient


def test_logged_bytes_are_what_marina_sent(draws):
    """With MARINA each step sends either the fp32 all-reduce (the first step and a shared coin with probability p)
    or the codes: the state counts which, and their mean over steps is the expected count of wire_bytes."""
    sent = draws["marina_bytes"]
    full = comm.wire_bytes(N, WORLD, "none")["sent"]
    coded = comm.wire_bytes(N, WORLD, "correlated", bits=4, chunk=CHUNK)["sent"]
    assert sent[0] == full and set(sent) == {full, coded}
    p_hat = sum(s == full for s in sent[1:]) / (len(sent) - 1)
    assert abs(p_hat - 0.5) < 5 * math.sqrt(0.25 / (len(sent) - 1))
    expected = comm.wire_bytes(N, WORLD, "correlated", bits=4, chunk=CHUNK, marina_p=0.5)["sent"]
    assert expected == 0.5 * full + 0.5 * coded


def test_wire_bytes_at_scale():
    """N = 1e8 entries, 8 ranks, 4-bit codes, MARINA p = 0.5: half the steps move the fp32 ring all-reduce."""
    n, world = 10**8, 8
    coded = comm.wire_bytes(n, world, "correlated", bits=4, chunk=1024)["sent"]
    full = 2 * (world - 1) / world * 4 * n
    assert comm.wire_bytes(n, world, "correlated", bits=4, chunk=1024, marina_p=0.5)["sent"] == pytest.approx(
        0.5 * full + 0.5 * coded
    )
    assert coded == pytest.approx((world - 1) * n / 2, rel=1e-2)  # codes dominate: (n - 1) N b / 8


def test_wire_bytes():
    n = 1 << 20
    fp32 = comm.wire_bytes(n, 2, "none")["sent"]
    assert fp32 == 4 * n  # ring all-reduce, 2 ranks: 2 (n-1)/n * 4 bytes per entry
    assert comm.wire_bytes(n, 2, "fp16")["sent"] == fp32 / 2
    q4 = comm.wire_bytes(n, 2, "correlated", bits=4, chunk=1024)["sent"]
    assert q4 == n // 2 + 4 * n // 1024
