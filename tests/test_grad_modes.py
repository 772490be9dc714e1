"""Every per-sample gradient mode gives the same clipped per-sample gradients, per family."""
import pytest
import torch

from models import build_adapter
from orchestrator.config import BetaVAEConfig, LDMConfig, VQVAEConfig
from trainers.privacy import GhostDPStepper, make_dp_stepper

SHAPE = (5, 16, 16)
FAMILIES = {
    "beta_vae": BetaVAEConfig(channels=[4, 8], latent_channels=2, norm_num_groups=4),
    "vq_vae": VQVAEConfig(channels=[4, 8], num_embeddings=16, embedding_dim=2),
    "ldm": LDMConfig(channels=[8, 16], norm_num_groups=4, num_head_channels=4, label_embedding_dim=8,
                     num_train_timesteps=50, num_inference_steps=2, label_dropout=0.0),
}


def clipped_sum(family, mode, C=0.01):
    torch.manual_seed(0)
    adapter = build_adapter(FAMILIES[family], SHAPE, 2)
    torch.manual_seed(1)
    data = {"image": torch.rand(3, 1, *SHAPE), "labels": torch.rand(3, 2) * 10,
            "label_mask": torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)}
    stepper = make_dp_stepper(mode, family, adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=0.0), 1,
                              noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.5, n_train=6, accountant="rdp")
    torch.manual_seed(2)  # the same latent / timestep / noise draws in every mode
    loss, _ = adapter.per_sample_loss(stepper.module, data)
    stepper.backward(loss)
    if isinstance(stepper, GhostDPStepper):
        return stepper._summed
    stepper.microbatch_done(last=False)
    return [p.summed_grad.clone() for p in stepper.params]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modes_agree_on_clipped_gradients(family):
    reference = clipped_sum(family, "functorch")
    total = torch.sqrt(sum((g ** 2).sum() for g in reference))
    assert 0 < total <= 3 * 0.01 * (1 + 1e-4)  # three samples, each clipped to C
    for mode in ("hooks", "ghost", "auto"):
        got = clipped_sum(family, mode)
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-7, msg=f"{family} {mode}")


def test_ghost_step_adds_noise_and_counts_it():
    torch.manual_seed(0)
    adapter = build_adapter(FAMILIES["beta_vae"], SHAPE, 0)
    stepper = make_dp_stepper("ghost", "beta_vae", adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=1.0),
                              1, noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.5, n_train=400, accountant="rdp")
    before = [p.detach().clone() for p in stepper.params]
    stepper.empty_microbatch()
    stepper.microbatch_done(last=True)  # an empty batch: pure noise, std sigma*C / (q n)
    delta = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, stepper.params)])
    assert stepper.steps == 1
    assert delta.std().item() == pytest.approx(2.0 * 0.5 / 200, rel=0.1)
