"""Train on synthetic, test on real (trainers/utility.py): the regressor learns labels from
volumes that carry them and not from volumes that do not, and the end-of-trial evaluation
logs `utility/...` beside the real-data reference `utility_real/...`."""
import numpy as np
import pytest
import torch

from models import build_adapter
from orchestrator.config import DataConfig, EvalConfig, LDMConfig, StageConfig
from trainers.phantoms import LABELS, _sample
from trainers.trial_eval import evaluate_trial
from trainers.utility import utility_metrics

torch.set_num_threads(1)
SHAPE = (13, 32, 32)


def phantoms(n, seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    pairs = [_sample(rng, shape, "private") for _ in range(n)]
    return torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None], np.stack([b for _, b in pairs])


def test_volumes_that_carry_the_labels_have_utility_and_noise_has_none():
    train, train_labels = phantoms(32, 0)
    test, test_labels = phantoms(32, 1)
    good = utility_metrics(train, train_labels, test, test_labels, LABELS, steps=120)
    noise = utility_metrics(torch.rand_like(train), train_labels, test, test_labels, LABELS, steps=120)
    assert good["utility/LVEDV/r"] > 0.4 and good["utility/r_mean"] > 0.3, good
    assert abs(noise["utility/r_mean"]) < 0.25 and good["utility/r_mean"] > noise["utility/r_mean"] + 0.2, noise
    assert {"utility/LVEDV/mae", "utility/ed_es_accuracy", "time/utility_s"} <= set(good)


def items(n, seed, shape):
    x, y = phantoms(n, seed, shape)
    return [{"image": x[i], "labels": torch.from_numpy(y[i]).float(), "label_mask": torch.ones(len(LABELS), dtype=torch.bool)}
            for i in range(n)]


def test_trial_evaluation_logs_utility_beside_the_real_reference_and_can_switch_it_off():
    shape = (5, 16, 16)
    test, train = items(8, 1, shape), items(12, 2, shape)
    data = DataConfig(labels=list(LABELS), shape=shape)
    ldm = LDMConfig(channels=[8, 16], norm_num_groups=4, num_head_channels=4, label_embedding_dim=8,
                    num_train_timesteps=20, num_inference_steps=2)
    adapter = build_adapter(ldm, shape, len(LABELS))
    on = StageConfig(name="s", model=ldm, eval={"n_samples": 8, "bootstrap": 100, "utility_steps": 20})
    m = evaluate_trial(adapter, on, data, test, "cpu", 4, train_set=train)
    for prefix in ("utility", "utility_real"):
        assert {f"{prefix}/LVEDV/r", f"{prefix}/LVEDV/mae", f"{prefix}/ed_es_accuracy", f"{prefix}/r_mean"} <= set(m)
    assert "utility/r_mean_ci_low" in m
    off = StageConfig(name="s", model=ldm, eval={"n_samples": 8, "bootstrap": 0, "utility": False})
    assert not [k for k in evaluate_trial(adapter, off, data, test, "cpu", 4, train_set=train) if "utility" in k]


def test_a_bootstrap_too_small_for_an_interval_is_refused():
    with pytest.raises(ValueError, match="bootstrap: 50 resamples"):
        EvalConfig(bootstrap=50)
