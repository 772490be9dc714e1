"""VQ-VAE adapter: shapes for any volume size, per-sample losses, a codebook that only
the (DP) optimizer moves, and the latent interface the diffusion stage uses."""
import pytest
import torch

from opacus.validators import ModuleValidator

from models.vq_vae import VQVAE
from orchestrator.config import VQVAEConfig
from trainers.privacy import DPStepper

torch.set_num_threads(1)


def make(shape=(5, 16, 16), seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = VQVAEConfig(**{"channels": [8, 16], "num_embeddings": 32, "embedding_dim": 4, **overrides})
    return VQVAE(cfg, shape, n_labels=2)


def batch(b, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 1, *shape, generator=g),
            "labels": torch.zeros(b, 2), "label_mask": torch.ones(b, 2, dtype=torch.bool)}


def structured(shape=(8, 16, 16)):
    """Two volumes with large flat regions: something a tiny VQ-VAE can learn in seconds."""
    x = torch.full((2, 1, *shape), 0.1)
    x[0, ..., : shape[2] // 2] = 0.9
    x[1, ..., shape[1] // 4: 3 * shape[1] // 4, :] = 0.7
    return {"image": x, "labels": torch.zeros(2, 2), "label_mask": torch.zeros(2, 2, dtype=torch.bool)}


def codebook(adapter):
    return adapter.network.quantizer.embedding.weight


@pytest.mark.parametrize("shape", [(13, 48, 48), (13, 33, 35), (5, 16, 16)])
def test_output_matches_any_input_shape_and_lies_in_unit_interval(shape):
    adapter = make(shape)
    x = batch(1, shape)["image"]
    with torch.no_grad():
        recon, vq, indices = adapter.network(x)
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1
    assert vq.shape == (1,)
    assert indices.shape[1:] == adapter.latent_shape[1:]


@pytest.mark.parametrize("codebook_mode", ["gradient", "ema"])
@pytest.mark.parametrize("b", [1, 3])
def test_per_sample_loss_has_one_entry_per_sample(codebook_mode, b):
    adapter = make(codebook=codebook_mode)
    loss, parts = adapter.per_sample_loss(adapter.network, batch(b, (5, 16, 16)))
    assert loss.shape == (b,)
    assert set(parts) == set(adapter.components) == {"recon", "vq", "perplexity"}
    assert all(v.shape == (b,) and not v.requires_grad for v in parts.values())
    torch.testing.assert_close(loss.detach(), parts["recon"] + parts["vq"])
    assert ((parts["perplexity"] >= 1) & (parts["perplexity"] <= 32)).all()


@pytest.mark.parametrize("codebook_mode", ["gradient", "ema"])
def test_a_sample_loss_does_not_depend_on_the_rest_of_the_batch(codebook_mode):
    # A batch-averaged VQ term would leak other samples into each "per-sample" loss,
    # and Opacus would clip the wrong thing.
    adapter = make(codebook=codebook_mode)
    adapter.network.eval()  # EMA mode would otherwise move its codebook between the two calls
    two = batch(2, (5, 16, 16))
    other = {k: v.clone() for k, v in two.items()}
    other["image"][1] = 1 - other["image"][1]
    with torch.no_grad():
        a, pa = adapter.per_sample_loss(adapter.network, two)
        b, pb = adapter.per_sample_loss(adapter.network, other)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(pa["vq"][0], pb["vq"][0])
    assert a[1] != b[1]


def test_dp_compatibility_is_declared_per_codebook():
    ok, _ = VQVAE.dp_compatible(make(codebook="gradient").cfg)
    refused, reason = VQVAE.dp_compatible(make(codebook="ema").cfg)
    assert ok and not refused and "ema" in reason
    assert ModuleValidator.validate(make().network, strict=False) == []


def test_ema_codebook_moves_without_the_optimizer():
    # The leak the gradient codebook exists to close; also shows the check in the DP test
    # below can see a data-driven update.
    adapter = make(codebook="ema")
    before = codebook(adapter).clone()
    adapter.per_sample_loss(adapter.network, batch(2, (5, 16, 16)))
    assert not torch.equal(before, codebook(adapter))


def dp_step(mode, lr, b=3, shape=(5, 16, 16)):
    adapter = make(shape)
    model = adapter.network
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = DPStepper(model, torch.optim.Adam(model.parameters(), lr=lr), 1, noise_multiplier=1.0,
                        max_grad_norm=1.0, sample_rate=0.5, n_train=8, accountant="rdp", grad_sample_mode=mode)
    loss, parts = adapter.per_sample_loss(stepper.module, batch(b, shape))
    stepper.backward(loss)
    return adapter, model, start, stepper


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_dp_step_gives_every_parameter_a_per_sample_gradient(mode):
    b = 3
    adapter, model, start, stepper = dp_step(mode, lr=0.0, b=b)
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())  # nothing frozen, nothing skipped
    for name, p in params.items():
        assert getattr(p, "grad_sample", None) is not None, name
        assert p.grad_sample.shape == (b, *p.shape), name
    # Only the codes a sample used get its gradient; each sample used at least one.
    gs = codebook(adapter).grad_sample
    assert (gs.flatten(1).abs().sum(1) > 0).all()
    stepper.microbatch_done(last=True)
    assert stepper.steps == 1
    # lr 0: noise was added, but nothing may have changed (no buffers, no side updates).
    assert list(model.buffers()) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_dp_step_moves_the_codebook_through_the_optimizer():
    adapter, model, start, stepper = dp_step("functorch", lr=1e-2)
    key = "net.quantizer.quantizer.embedding.weight"
    assert torch.equal(model.state_dict()[key], start[key])  # forward + backward alone: no change
    stepper.microbatch_done(last=True)
    assert not torch.equal(model.state_dict()[key], start[key])


def test_gradient_codebook_learns_and_uses_several_codes():
    adapter = make((8, 16, 16))
    data = structured()
    opt = torch.optim.Adam(adapter.network.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, parts = adapter.per_sample_loss(adapter.network, data)
        first = loss.mean().item() if first is None else first
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        loss, parts = adapter.per_sample_loss(adapter.network, data)
    assert loss.mean().item() < 0.5 * first
    assert parts["perplexity"].mean() > 1.3  # 1.0 = every voxel on one code (collapse)


@pytest.mark.parametrize("shape", [(13, 33, 35), (5, 16, 16)])
def test_latent_round_trip(shape):
    adapter = make(shape)
    x = batch(2, shape)["image"]
    z = adapter.encode_latent(x)
    assert z.shape == (2, *adapter.latent_shape)
    torch.testing.assert_close(adapter.encode_latent(x), z)  # deterministic
    # Every latent vector is a codebook entry.
    vectors = z.movedim(1, -1).reshape(-1, z.shape[1])
    assert torch.cdist(vectors, codebook(adapter)).min(1).values.max() < 1e-6
    out = adapter.decode_latent(z)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        recon, _, _ = adapter.network(x)
    torch.testing.assert_close(out, recon)  # decode(encode(x)) is the autoencoder's output
    # A continuous latent (a diffusion sample) is snapped to the nearest codes first.
    torch.testing.assert_close(adapter.decode_latent(z + 1e-4 * torch.randn_like(z)), out)
