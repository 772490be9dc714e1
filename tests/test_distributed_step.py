"""The DP step with two ranks, without Ray: two processes over gloo (torch.multiprocessing),
each running the steppers the training loop uses, as the loop drives them (Poisson batches
per rank, physical micro-batches, an empty local batch is still a step).

What must hold with several ranks: the noise is drawn once per step (on rank 0) with std
sigma * C, the all-reduced update leaves the parameters identical on every rank, and a rank
whose Poisson batch is empty still takes (and counts) the step."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port, tiny_model   # same seed: identical weights on every rank

SIGMA, C, N_TRAIN, BATCH, PBS = 1.3, 0.5, 24, 2, 2     # q = 1/12: local batches are often empty
NOISE_STEPS, EPOCHS = 24, 2
TIMEOUT_S = 120


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def make_stepper(mode, model, lr, world):
    from trainers.privacy import make_dp_stepper

    return make_dp_stepper(mode, "test", model, torch.optim.SGD(model.parameters(), lr=lr), world,
                           noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=BATCH / N_TRAIN, n_train=N_TRAIN,
                           accountant="rdp")   # noise_seed None: secret noise, the DP default


def _rank(rank, world, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        from trainers.privacy import PoissonSampler

        # 1. no data on either rank: with SGD at lr 1 an update is exactly -(noise / (q n))
        model = tiny_model()
        stepper = make_stepper(mode, model, 1.0, world)
        draws = []
        for _ in range(NOISE_STEPS):
            before = flat(stepper.network)
            stepper.empty_microbatch()
            stepper.microbatch_done(last=True)
            draws.append((before - flat(stepper.network)) * BATCH)   # q * n_train = BATCH
        noise_steps = stepper.steps

        # 2. Poisson batches split over the ranks, micro-batches of PBS, as in the loop
        g = torch.Generator().manual_seed(1)                      # the same data on every rank
        x, y = torch.randn(N_TRAIN, 1, 3, 4, 4, generator=g), torch.randn(N_TRAIN, generator=g) * 3
        model = tiny_model()
        stepper = make_stepper(mode, model, 0.05, world)
        sampler = PoissonSampler(N_TRAIN, BATCH, rank, world, seed=None)
        events = empty = 0
        for epoch in range(EPOCHS):
            for local in sampler.epoch(epoch):
                events += 1
                empty += len(local) == 0
                chunks = [local[i:i + PBS] for i in range(0, len(local), PBS)] or [local]
                for j, chunk in enumerate(chunks):
                    if len(chunk) == 0:
                        stepper.empty_microbatch()
                    else:
                        idx = torch.as_tensor(chunk)
                        loss = (stepper.module(x[idx]).squeeze(1) - y[idx]) ** 2
                        stepper.backward(loss)
                    stepper.microbatch_done(last=j == len(chunks) - 1)
        torch.save({"noise": torch.stack(draws), "noise_steps": noise_steps, "params": flat(stepper.network),
                    "init": flat(tiny_model()), "steps": stepper.steps, "events": events, "empty": empty,
                    "epsilon": stepper.epsilon(1e-5)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(mode, tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, mode, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S + 60)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung: the ranks took different numbers of all-reduced steps"
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_two_ranks_one_noise_draw_identical_parameters_empty_batches_count(mode, tmp_path):
    r0, r1 = run_two_ranks(mode, tmp_path)

    # one Gaussian draw per step with std sigma * C: neither missing (0) nor one per rank
    # (sqrt(2) sigma C), and every rank applied the same noisy update
    torch.testing.assert_close(r0["noise"], r1["noise"], rtol=0, atol=1e-6)
    noise = r0["noise"].flatten()
    assert noise.numel() > 5000
    assert abs(noise.mean().item()) < 0.05 * SIGMA * C
    assert noise.std().item() == pytest.approx(SIGMA * C, rel=0.05)
    # independent draws: consecutive steps' noise is uncorrelated
    a, b = r0["noise"][:-1].flatten(), r0["noise"][1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05
    assert r0["noise_steps"] == r1["noise_steps"] == NOISE_STEPS

    # training: the ranks' parameters moved, and stayed identical
    assert not torch.allclose(r0["params"], r0["init"])
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=1e-6)

    # every sampling event is a step on both ranks, also those where this rank's batch was
    # empty (and the test only means something if that happened)
    events = EPOCHS * (N_TRAIN // BATCH)
    assert r0["events"] == r1["events"] == events
    assert r0["empty"] > 0 and r1["empty"] > 0
    assert r0["steps"] == r1["steps"] == events
    assert r0["epsilon"] == r1["epsilon"] > 0
