"""Claims the README and the design make about one trial, checked on the real training loop
(`trainers.loop.train_worker`, run in this process as the one rank of a Ray Train run):
noise multiplicity K > 1 trains, `dp.target_epsilon` is planned so the run ends at it, the
EMA weights are the ones sampling uses, and a DP generator's latent scale never comes from
private data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import trainers.generators as generators
from tests.helpers import independent_epsilon, phantom_data, run_loop
from trainers.checkpoints import load_generator, load_state
from trainers.privacy import DPStepper

SHAPE = (5, 16, 16)
LDM = {"kind": "ldm", "channels": [8, 16], "num_head_channels": 4, "norm_num_groups": 4,
       "label_embedding_dim": 8, "num_train_timesteps": 50, "num_inference_steps": 2}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def private_data(tmp_path_factory):
    return phantom_data(tmp_path_factory.mktemp("private") / "data", n=12, shape=SHAPE)


def ldm_stage(**dp):
    return {"name": "ldm", "model": dict(LDM),
            "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "sample_grid": 0,
                      "max_steps_per_epoch": 2},
            "dp": {"enabled": True, "noise_multiplier": 1.0, **dp}, "eval": {"enabled": False}}


def test_noise_multiplicity_runs_through_the_training_loop(monkeypatch, tmp_path, private_data):
    """K = 3 draws per sample: every backward the loop makes hands the stepper K rows per
    sample, and the stepper turns them into one per-sample gradient per sample."""
    calls = []
    backward = DPStepper.backward

    def spy(self, per_sample_loss, rows_per_sample=1, units=None):
        backward(self, per_sample_loss, rows_per_sample, units)
        calls.append((len(per_sample_loss), rows_per_sample, self.params[0].grad_sample.shape[0]))

    monkeypatch.setattr(DPStepper, "backward", spy)
    stage = ldm_stage(noise_multiplicity=3, grad_sample_mode="functorch")
    stage["train"]["max_steps_per_epoch"] = 3
    reports = run_loop(monkeypatch, tmp_path, stage, private_data)
    assert calls, "no non-empty batch in 2 Poisson steps"
    assert all(rows == 3 and per_sample == samples for samples, rows, per_sample in calls), calls
    metrics = reports[-1][0]
    # 8 training volumes at batch 4: 2 sampling events, under the cap of 3
    assert metrics["privacy/steps"] == 2 and np.isfinite(metrics["train/loss"])


def test_target_epsilon_is_planned_so_the_run_ends_there(monkeypatch, tmp_path, private_data):
    stage = ldm_stage(target_epsilon=4.0, noise_multiplier=None)
    stage["train"].update(epochs=2, max_steps_per_epoch=None)
    reports = run_loop(monkeypatch, tmp_path, stage, private_data)
    m = reports[-1][0]
    sigma, q, steps = m["privacy.noise_multiplier"], m["privacy.sample_rate"], m["privacy/steps"]
    assert steps == m["privacy.steps_planned"] == 2 * 2          # 8 training volumes, q = 0.5
    assert m["privacy/epsilon"] == pytest.approx(4.0, abs=0.02)
    assert m["privacy/epsilon"] <= 4.0 + 1e-9                     # never above the target
    assert independent_epsilon(sigma, q, steps, 1e-3, "rdp") == pytest.approx(4.0, rel=0.01)
    # the first epoch spent only part of it
    assert reports[0][0]["privacy/epsilon"] < 3.5


def test_sampling_uses_the_ema_weights(monkeypatch, tmp_path, private_data):
    from orchestrator import sample

    stage = ldm_stage()
    stage["train"].update(epochs=2, ema_decay=0.5, lr=1e-2)
    reports = run_loop(monkeypatch, tmp_path, stage, private_data)
    ckpt = reports[-1][1]
    state = load_state(ckpt)
    assert state["ema_model"] is not None
    moved = [k for k, v in state["model"].items() if not torch.equal(v, state["ema_model"][k])]
    assert moved, "EMA equals the trained weights: the test could not tell them apart"

    adapter, _ = load_generator(ckpt)
    for k, v in adapter.network.state_dict().items():
        assert torch.equal(v, state["ema_model"][k]), k

    out = tmp_path / "s.npz"
    assert sample.main(["--checkpoint", str(ckpt), "--n", "2", "--out", str(out)]) == 0
    drawn = np.load(out)["images"]

    def draw(weights):
        adapter.network.load_state_dict(weights)
        x = adapter.sample(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool),
                           generator=torch.Generator().manual_seed(0))
        return x[:, 0].numpy()

    np.testing.assert_allclose(drawn, draw(state["ema_model"]), atol=1e-5)
    assert np.abs(drawn - draw(state["model"])).max() > 1e-4


def test_dp_generator_latent_scale_never_comes_from_private_data(monkeypatch, tmp_path, private_data):
    """A DP latent diffusion stage on a compression model, with no public data and no
    pretrained checkpoint: the scale is 1.0, and no private volume is encoded to get it.
    With public data at hand, the scale comes from there."""
    ae = {"name": "ae", "model": {"kind": "beta_vae", "channels": [4, 8], "norm_num_groups": 4},
          "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "max_steps_per_epoch": 1},
          "dp": {"enabled": True, "noise_multiplier": 1.0}, "eval": {"enabled": False}}
    ae_ckpt = run_loop(monkeypatch, tmp_path / "ae", ae, private_data)[-1][1]

    encoded_from = []
    latent_std = generators.latent_std

    def spy(compression, data, *args, **kw):
        encoded_from.append(data.root)
        return latent_std(compression, data, *args, **kw)

    monkeypatch.setattr(generators, "latent_std", spy)
    m = run_loop(monkeypatch, tmp_path / "dp", ldm_stage(), private_data, needs=str(ae_ckpt))[-1][0]
    assert encoded_from == []
    assert m["param.latent.scale_factor"] == 1.0
    assert "never computed from private data" in m["param.latent.scale_source"]

    public = phantom_data(tmp_path / "public", n=12, shape=SHAPE, private=False, seed=5)
    m = run_loop(monkeypatch, tmp_path / "pub", ldm_stage(), private_data, needs=str(ae_ckpt),
                 scale_data=public)[-1][0]
    assert encoded_from == [public["root"]]
    assert m["param.latent.scale_source"].startswith("public data")
    assert m["param.latent.scale_factor"] != 1.0


def test_channels_last_trains_the_same_weights(monkeypatch, tmp_path, private_data):
    """train.memory_format: channels_last_3d is a layout, not a different computation: the
    same reproducible DP run (labels through the timestep embedding too) ends at the same
    weights in either layout, and its checkpoint loads for sampling."""
    finals = {}
    for layout in ("default", "channels_last_3d"):
        stage = ldm_stage(grad_sample_mode="bk", reproducible=True)
        stage["model"]["label_conditioning"] = "both"
        stage["train"].update(memory_format=layout, seed=3)
        reports = run_loop(monkeypatch, tmp_path / layout, stage, private_data)
        state = load_state(reports[-1][1])
        finals[layout] = state["model"]
        assert reports[-1][0]["privacy/steps"] == 2
    assert any(not v.is_contiguous() for v in finals["channels_last_3d"].values() if v.dim() == 5)
    for k, v in finals["default"].items():
        torch.testing.assert_close(finals["channels_last_3d"][k].contiguous(), v, rtol=1e-4, atol=1e-5, msg=k)
    adapter, _ = load_generator(reports[-1][1])
    x = adapter.sample(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 1, *SHAPE) and torch.isfinite(x).all()


@pytest.mark.parametrize("dp", [False, True], ids=["non-dp", "dp"])
def test_lr_schedule_runs_over_the_optimizer_steps(monkeypatch, tmp_path, private_data, dp):
    """cosine over 2 epochs x 2 steps: lr/2 after the first epoch, 0 at the end; the
    schedule's state is in the checkpoint, for a resume to continue it."""
    stage = ldm_stage()
    stage["dp"]["enabled"] = dp
    stage["train"].update(epochs=2, lr=1e-2, lr_schedule="cosine")
    reports = run_loop(monkeypatch, tmp_path, stage, private_data)
    assert [r[0]["train/lr"] for r in reports] == pytest.approx([5e-3, 0.0], abs=1e-9)
    state = load_state(reports[-1][1])
    assert state["lr_schedule"]["last_epoch"] == 4
    # resumed after the first epoch: the schedule continues (a fresh one would restart at lr)
    resumed = run_loop(monkeypatch, tmp_path / "resumed", stage, private_data, checkpoint=reports[0][1])
    assert resumed[-1][0]["train/lr"] == pytest.approx(0.0, abs=1e-9)
