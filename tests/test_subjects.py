"""Patient-level privacy (`privacy.unit: subject`): a subject's volumes are sampled, clipped
and accounted as one unit; subjects are declared, kept in one split, and a record-level run
on data with subjects reports the patient's epsilon by group privacy."""
import copy
import math

import numpy as np
import pytest
import torch

from models import build_adapter
from orchestrator import ledger as L
from orchestrator.errors import DataError
from tests.helpers import independent_epsilon, phantom_data, run_loop
from tests.test_grad_modes import FAMILIES, SHAPE
from trainers.data import validate_dataset
from trainers.phantoms import SUBJECT_PATTERN, synthesize
from trainers.privacy import (PoissonSampler, group_epsilon, make_dp_stepper, microbatches, unit_ids)

torch.set_num_threads(1)

# Two micro-batches of one logical step, six volumes of four subjects with 1, 2 or 3 volumes:
# micro-batch 1 holds subject 0 (volumes 0, 1) and subject 1 (volume 2); micro-batch 2 holds
# subject 2 (volume 3) and subject 3 (volumes 4, 5).
MICRO = [(slice(0, 3), [0, 0, 1]), (slice(3, 6), [0, 1, 1])]
SUBJECT_OF = [0, 0, 1, 2, 3, 3]
MODES = {"functorch": {}, "hooks": {}, "bk": {}, "bk-ghost": {"ghost": True}, "bk-instantiate": {"ghost": False}}


def _setup(family, k):
    torch.manual_seed(0)
    adapter = build_adapter(FAMILIES[family], SHAPE, 2)
    with torch.no_grad():
        for p in adapter.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if k > 1:
        adapter.noise_multiplicity = k
    torch.manual_seed(1)
    data = {"image": torch.rand(6, 1, *SHAPE), "labels": torch.rand(6, 2) * 10,
            "label_mask": torch.ones(6, 2, dtype=torch.bool)}
    return adapter, data


def _chunk(data, s):
    return {key: v[s] for key, v in data.items()}


def _direct_subject_clipped_sum(family, k):
    """Each volume's gradient by a plain backward of its own loss (same draws as the DP run),
    summed per subject, the subject's sum clipped to C, the clipped sums added."""
    adapter, data = _setup(family, k)
    plain = copy.deepcopy(adapter.network)
    params = [p for p in plain.parameters() if p.requires_grad]
    per_volume = []
    for j, (s, _) in enumerate(MICRO):
        for i in range(s.stop - s.start):
            torch.manual_seed(100 + j)
            loss, _ = adapter.per_sample_loss(plain, _chunk(data, s))
            per_volume.append([g if g is not None else torch.zeros_like(p)
                               for p, g in zip(params, torch.autograd.grad(loss[i], params, allow_unused=True))])
    subjects = [[sum(per_volume[v][j] for v in range(6) if SUBJECT_OF[v] == u) for j in range(len(params))]
                for u in range(4)]
    norms = [torch.sqrt(sum((g ** 2).sum() for g in gs)).item() for gs in subjects]
    C = sorted(norms)[1] * 1.01    # two subjects stay under the bound, two are clipped
    want = [sum(gs[j] * min(1.0, C / (n + 1e-6)) for gs, n in zip(subjects, norms)) for j in range(len(params))]
    return want, C


def _dp_clipped_sum(family, mode, k, C):
    adapter, data = _setup(family, k)
    stepper = make_dp_stepper(mode.split("-")[0], family, adapter.network,
                              torch.optim.SGD(adapter.network.parameters(), lr=0.0), 1, noise_multiplier=1.0,
                              max_grad_norm=C, sample_rate=0.5, n_train=8, accountant="rdp", **MODES[mode])
    for j, (s, units) in enumerate(MICRO):
        torch.manual_seed(100 + j)
        loss, _ = adapter.per_sample_loss(stepper.module, _chunk(data, s))
        stepper.backward(loss, getattr(adapter, "rows_per_sample", 1), units=torch.tensor(units))
        stepper.microbatch_done(last=False)
    return stepper._summed if hasattr(stepper, "_summed") else [p.summed_grad for p in stepper.params]


@pytest.mark.parametrize("family,k", [("beta_vae", 1), ("vq_vae", 1), ("ldm", 1), ("ldm", 2)])
def test_each_subject_is_clipped_once_in_every_mode(family, k):
    """Variable volumes per subject (1 or 2 in a micro-batch), two micro-batches, and with
    K = 2 noise draws per volume on top: every mode gives the clipped sum of the direct
    per-subject computation."""
    want, C = _direct_subject_clipped_sum(family, k)
    floor = 1e-6 * torch.sqrt(sum((w ** 2).sum() for w in want))
    modes = list(MODES) if k == 1 else ["hooks", "bk-ghost", "bk-instantiate"]
    for mode in modes:
        got = _dp_clipped_sum(family, mode, k, C)
        for j, (a, b) in enumerate(zip(got, want)):
            assert (a - b).norm() <= 2e-3 * b.norm() + floor, f"{family} {mode} K={k} param {j}"


def test_clipping_per_volume_is_not_clipping_per_subject():
    """The test above has teeth: the same run without units (each volume clipped alone) is off."""
    want, C = _direct_subject_clipped_sum("beta_vae", 1)
    adapter, data = _setup("beta_vae", 1)
    stepper = make_dp_stepper("bk", "beta_vae", adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=0.0),
                              1, noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.5, n_train=8, accountant="rdp")
    for j, (s, _) in enumerate(MICRO):
        torch.manual_seed(100 + j)
        loss, _ = adapter.per_sample_loss(stepper.module, _chunk(data, s))
        stepper.backward(loss)
        stepper.microbatch_done(last=False)
    err = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(stepper._summed, want)))
    assert err > 0.05 * torch.sqrt(sum((b ** 2).sum() for b in want))


def test_ghost_refuses_subjects():
    adapter, data = _setup("beta_vae", 1)
    stepper = make_dp_stepper("ghost", "beta_vae", adapter.network, torch.optim.SGD(adapter.network.parameters(), lr=0.0),
                              1, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, n_train=8, accountant="rdp")
    loss, _ = adapter.per_sample_loss(stepper.module, _chunk(data, slice(0, 3)))
    with pytest.raises(ValueError, match="per subject"):
        stepper.backward(loss, units=torch.tensor([0, 0, 1]))


def test_microbatches_never_split_a_subject():
    unit_of = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 4])
    local = np.arange(12)
    chunks = microbatches(local, 4, unit_of)
    assert np.concatenate(chunks).tolist() == local.tolist()
    for c in chunks:
        assert len(c) <= 4 or len(set(unit_of[c])) == 1          # only a lone big subject exceeds the size
        assert unit_ids(c, unit_of).tolist() == np.unique(unit_of[c], return_inverse=True)[1].tolist()
    owners = [set(unit_of[c]) for c in chunks]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    assert [len(c) for c in chunks] == [4, 3, 5]     # greedy packing, the 5-volume subject alone
    assert microbatches(np.zeros(0, dtype=int), 4, unit_of)[0].size == 0
    assert unit_ids(local, None) is None


def test_subject_sampling_rate_and_togetherness():
    """Each subject joins each step with probability q = batch / n_subjects, over two ranks
    that own disjoint subjects, and always with all of its volumes."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, size=60)                     # 60 subjects of 1-3 volumes
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    units = [np.arange(a, a + n) for a, n in zip(starts, sizes)]
    n_train = int(sizes.sum())
    batch, epochs = 15, 100
    samplers = [PoissonSampler(n_train, batch, r, 2, None, units=units) for r in range(2)]
    assert all(s.sample_rate == batch / 60 and s.steps == 4 for s in samplers)
    counts = np.zeros(60)
    for e in range(epochs):
        for parts in zip(*(s.epoch(e) for s in samplers)):
            for rank, part in enumerate(parts):
                members = set(samplers[0].unit_of[part].tolist())
                assert all(u % 2 == rank for u in members)             # sharded by subject
                for u in members:
                    assert set(units[u].tolist()) <= set(part.tolist())  # all of its volumes
                    counts[u] += 1
                assert len(part) == sum(len(units[u]) for u in members)
    rate = counts / (epochs * 4)
    assert abs(rate.mean() - 0.25) < 0.01 and rate.min() > 0.15 and rate.max() < 0.35


@pytest.fixture(scope="module")
def subject_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects") / "data"
    return phantom_data(root, n=24)     # 12 subjects at ED and ES: 10 / 1 / 1 by subject -> 20 training volumes


def _stage(**dp):
    return {"model": {"kind": "beta_vae", "channels": [4], "latent_channels": 1, "norm_num_groups": 2},
            "train": {"epochs": 2, "lr": 1e-3, "batch_size": 4, "physical_batch_size": 3, "seed": 0},
            "dp": {"enabled": True, "noise_multiplier": 1.2, "max_grad_norm": 1.0, **dp},
            "eval": {"enabled": False}}


def test_subject_run_accounts_at_q_over_subjects(monkeypatch, tmp_path, subject_data):
    """privacy.unit subject through the real loop: q = batch / n_subjects, steps = epochs / q,
    epsilon = dp-accounting's at those facts, and it is the patient's epsilon."""
    reports = run_loop(monkeypatch, tmp_path, _stage(), subject_data, unit="subject")
    m = reports[-1][0]
    assert m["privacy.unit"] == "subject" and m["privacy.sample_rate"] == pytest.approx(4 / 10)
    assert m["privacy/steps"] == 2 * math.ceil(10 / 4)
    want = independent_epsilon(1.2, 0.4, m["privacy/steps"], 1e-3, "rdp")
    assert m["privacy/epsilon"] == pytest.approx(want, rel=0.02)
    assert m["privacy/epsilon_subject"] == m["privacy/epsilon"]
    assert np.isfinite(m["train/loss"])


def test_record_run_on_subject_data_reports_the_patients_epsilon(monkeypatch, tmp_path, subject_data):
    """Record level on data with declared subjects: q over volumes, and beside the record's
    epsilon the patient's by group privacy for k = 2 volumes, recomputed here with
    dp-accounting's RDP curve and the same (k eps, k e^{(k-1) eps} delta') conversion."""
    reports = run_loop(monkeypatch, tmp_path, _stage(), subject_data)
    m = reports[-1][0]
    assert m["privacy.unit"] == "record" and m["privacy.sample_rate"] == pytest.approx(4 / 20)
    assert m["privacy.group_size"] == 2
    steps, delta = m["privacy/steps"], 1e-3
    assert steps == 2 * 5
    want = _independent_group_epsilon(1.2, 0.2, steps, delta, 2)
    assert m["privacy/epsilon_subject"] == pytest.approx(want, rel=0.03)
    assert m["privacy/epsilon_subject"] > 1.5 * m["privacy/epsilon"]


def _independent_group_epsilon(sigma, q, steps, delta, k):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    best = math.inf
    for d in np.logspace(math.log10(delta / k), math.log10(delta / k) - 12, 400):
        eps = acc.get_epsilon(float(d))
        if k * math.exp((k - 1) * eps) * d <= delta:
            best = min(best, k * eps)
    return best


def test_group_epsilon_properties():
    hist = [(1.0, 0.05, 200)]
    e1 = group_epsilon(hist, 1e-5, 1, "rdp")
    e2, e3 = group_epsilon(hist, 1e-5, 2, "rdp"), group_epsilon(hist, 1e-5, 3, "rdp")
    assert e1 < e2 < e3 and e2 > 2 * group_epsilon(hist, 1e-5 / 2, 1, "rdp") * 0.99
    assert e2 == pytest.approx(_independent_group_epsilon(1.0, 0.05, 200, 1e-5, 2), rel=0.03)
    g1, g2 = group_epsilon(hist, 1e-5, 1, "gdp"), group_epsilon(hist, 1e-5, 2, "gdp")
    assert g2 > 1.5 * g1


def test_ledger_units_per_dataset():
    """All record-level: the subject's epsilon is the group bound; all subject-level: one
    number; mixed on one dataset: composed at the subject level and larger than each part."""
    rec = L.Mechanism(1.0, 0.1, 100, "a", "t1", "/d", "record", 2)
    sub = L.Mechanism(1.0, 0.2, 50, "b", "t2", "/d", "subject")
    book = L.ledger_for([rec], 1e-5, "rdp")["datasets"]["/d"]
    assert book["unit"] == "record" and book["group_size"] == 2
    assert book["epsilon_subject"] == pytest.approx(group_epsilon([(1.0, 0.1, 100)], 1e-5, 2, "rdp"))
    only = L.ledger_for([sub], 1e-5, "rdp")
    assert only["datasets"]["/d"]["epsilon_subject"] == only["epsilon_total"] == only["epsilon_total_subject"]
    mixed = L.ledger_for([rec, sub], 1e-5, "rdp")
    d = mixed["datasets"]["/d"]
    assert d["unit"] == "mixed" and d["epsilon"] == d["epsilon_subject"] == mixed["epsilon_total"]
    assert d["epsilon_subject"] > max(book["epsilon_subject"], only["epsilon_total"])
    # a record-level dataset without declared subjects: the patient's epsilon is unknown
    unknown = L.ledger_for([L.Mechanism(1.0, 0.1, 100, "a", "t", "/e")], 1e-5, "rdp")
    assert unknown["datasets"]["/e"]["epsilon_subject"] is None and unknown["epsilon_total_subject"] is None


def test_subjects_declared_by_pattern_or_field_and_kept_in_one_split(tmp_path):
    root = tmp_path / "p"
    synthesize(root, n=12, shape=(5, 16, 16), labels=["LVEDV", "ESED"])
    by_field = validate_dataset(root, ["LVEDV", "ESED"], (5, 16, 16))
    by_pattern = validate_dataset(root, ["LVEDV", "ESED"], (5, 16, 16), subject_pattern=SUBJECT_PATTERN)
    assert by_field.subjects == by_pattern.subjects and by_field.n_subjects("training") == 4
    assert by_field.group_size("training") == 2
    with pytest.raises(DataError, match=r"s000000_ed.npz .*: path does not match data.subject_pattern") as e:
        validate_dataset(root, ["LVEDV", "ESED"], (5, 16, 16), subject_pattern=r"p(\d+)x")
    assert "\n" not in str(e.value) and "training sample" in str(e.value)
    # one subject's ES frame moved into the test split: a person in two splits
    train, test = list(np.load(root / "training.npy")), list(np.load(root / "testing.npy"))
    moved = train.pop()
    np.save(root / "training.npy", np.array(train))
    np.save(root / "testing.npy", np.array(test + [moved]))
    with pytest.raises(DataError, match=r"subject 's000003' has volumes in the training and testing splits"):
        validate_dataset(root, ["LVEDV", "ESED"], (5, 16, 16))


def test_a_sample_without_subject_among_samples_with_one_is_refused(tmp_path):
    root = tmp_path / "p"
    synthesize(root, n=6, shape=(5, 16, 16), labels=["LVEDV"])
    f = root / "samples" / "s000001_es.npz"
    with np.load(f) as z:
        image, labels = z["image"], z["labels"]
    np.savez(f, image=image, labels=labels)
    with pytest.raises(DataError, match=r"s000001_es.npz .* has no `subject` entry while other samples do"):
        validate_dataset(root, ["LVEDV"], (5, 16, 16))


def test_a_lineage_that_trained_on_private_subjects_without_dp_is_infinite_per_patient_too():
    """A DP compression model on private subjects, then a non-DP generator fine-tuned on them:
    the generator's lineage is infinite per volume AND per patient (was 0.0 per patient: the
    ledger composed only the mechanisms it had, and the non-DP trial has none)."""
    from orchestrator.accounting import lineage_total

    dp = {"key": "ae", "stage": "ae", "trial_id": "t0", "private": True, "dp": True, "sigma": 1.0, "q": 0.1,
          "steps": 10, "data": "/d", "unit": "subject", "group_size": 2}
    leak = {"key": "gen", "stage": "gen", "trial_id": "t1", "private": True, "dp": False, "data": "/d",
            "needs_key": "ae"}
    rows = {r["key"]: r for r in (dp, leak)}
    eps, book = lineage_total(leak, rows, 1e-5, "rdp")
    assert eps == book["epsilon_total"] == book["epsilon_total_subject"] == math.inf
    assert book["not_private"]
    eps, book = lineage_total(dp, rows, 1e-5, "rdp")      # the DP model alone stays finite
    assert 0 < book["epsilon_total"] == book["epsilon_total_subject"] < math.inf
