"""The sweep file schema: the single source of truth for keys, types and defaults.

Typed classes, one per section of a sweep file, with their checks; the stage graph order,
dotted paths into a stage config, and the combinations a search can draw. Reading a YAML
file into these classes, one-line errors and the README's reference generated from them
are `orchestrator/sweep_file.py` (``python -m orchestrator.config SWEEP.yaml | --reference``).
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

PHANTOM_LABELS = ["LVEDV", "LVESV", "LVEF", "MYOEDTHICK", "MYOESTHICK", "ESED"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `noise_multipler` must not silently fall back
    # to a default and produce a run the user did not ask for.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SynthesizeConfig(_Strict):
    """Make a phantom dataset at `data.root` if it does not exist yet."""
    kind: Literal["phantom"] = Field("phantom", description="only `phantom` is built in")
    n: int = Field(256, ge=6, description="number of volumes: ceil(n/2) subjects imaged at ED and ES (split 80/10/10 by subject)")
    seed: int = Field(0, description="random seed of the phantom generator")
    variant: Literal["private", "public"] = Field(
        "private", description="`public`: a shifted distribution for pretraining")


class DataConfig(_Strict):
    """The dataset: index files `training.npy`, `validation.npy`, `testing.npy` under `root`."""
    root: str = Field("data/phantom", description="folder with the three index files (relative paths: to the working directory)")
    labels: list[str] = Field(default_factory=lambda: list(PHANTOM_LABELS),
                              description="names of the columns of each sample's `labels`, stored order")
    shape: tuple[int, int, int] = Field((13, 48, 48), description="expected (D, H, W) of every sample")
    allow_pickle: bool = Field(False, description="read `.npy` samples holding a pickled dict (trusted data only)")
    private: bool = Field(True, description="true: DP stages account for this data, non-DP stages on it are tagged not private; false: public, costs no budget")
    synthesize: Optional[SynthesizeConfig] = Field(None, description="make a phantom dataset at `root` if absent")
    subject_pattern: Optional[str] = Field(
        None, description="regex whose first group, searched in each sample's path as the index file writes it, is "
                          "the sample's subject (patient); null: a `subject` entry in the sample files, if any "
                          r"(the phantoms write both; their pattern: `(s\d+)_e[ds]`)")

    @model_validator(mode="before")
    @classmethod
    def _three_sizes(cls, raw):
        shape = raw.get("shape") if isinstance(raw, dict) else None
        if isinstance(shape, (list, tuple)) and len(shape) != 3:
            raise ValueError(f"shape: expected three sizes (D, H, W), got {list(shape)}")
        return raw

    @model_validator(mode="after")
    def _check(self):
        if any(s < 1 for s in self.shape):
            raise ValueError(f"shape: expected three positive sizes (D, H, W), got {list(self.shape)}")
        if self.subject_pattern is not None:
            try:
                groups = re.compile(self.subject_pattern).groups
            except re.error as e:
                raise ValueError(f"subject_pattern: {self.subject_pattern!r} is not a regular expression ({e})") from None
            if groups < 1:
                raise ValueError(f"subject_pattern: {self.subject_pattern!r} has no group; expected the subject id "
                                 r"in the first (...) group, e.g. '(s\d+)_'")
        if len(set(self.labels)) != len(self.labels):
            twice = next(n for n in self.labels if self.labels.count(n) > 1)
            raise ValueError(f"labels: names must be unique; {twice!r} is listed more than once")
        return self


class PrivacyConfig(_Strict):
    """How epsilon is accounted."""
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta; must be below 1/n_train")
    accountant: Literal["prv", "rdp", "gdp"] = Field("prv", description="Opacus accountant")
    unit: Literal["record", "subject"] = Field(
        "record", description="the unit of privacy: `record` (one volume) or `subject` (all of a patient's volumes "
                              "together: Poisson sampling, clipping and q over subjects; needs declared subjects, "
                              "see data.subject_pattern); a stage may override it with its own `privacy: {unit}`")


class StagePrivacyConfig(_Strict):
    """A stage's own unit of privacy (overrides the top-level `privacy.unit`)."""
    unit: Optional[Literal["record", "subject"]] = Field(None, description="record | subject; null: the top-level unit")


class ClusterConfig(_Strict):
    """Where trials run."""
    address: Optional[str] = Field(None, description="null: start a local Ray; `auto` or `ray://host:port`: join a cluster")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers (processes) per trial")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each Train worker reserves")
    use_gpu: Literal[True, False, "auto"] = Field("auto", description="`auto`: GPUs when the cluster has them")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each Train worker reserves when GPUs are used; below 1 shares a GPU between small trials")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="null: as many as the cluster's CPUs/GPUs fit")
    spread_cpus: bool = Field(False, description="a non-DP stage with fewer trials than fit at once gives the idle CPUs "
                                                 "to its trials' workers (more torch threads each): a lone trial on a "
                                                 "2-core machine trains with 2 threads, not 1. DP stages keep "
                                                 "`cpus_per_worker`")
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only: logical CPUs to declare (default: all cores)")
    dashboard_host: str = Field("127.0.0.1", description="local Ray only: where the dashboard listens")
    max_failures: int = Field(2, ge=0, description="worker-group restarts per trial (resumes from the last checkpoint)")


class TrackingConfig(_Strict):
    """Where results are recorded."""
    uri: Optional[str] = Field(None, description="MLflow tracking URI; null: `sqlite:///<output>/mlflow.db`")


class BetaVAEConfig(_Strict):
    """beta-VAE on MONAI's AutoencoderKL."""
    kind: Literal["beta_vae"] = "beta_vae"
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="channels per level; each level after the first halves D, H, W (H, W only with `downsample: in_plane`)")
    downsample: Literal["all", "in_plane"] = Field(
        "all", description="`in_plane`: strided layers halve H and W only, with depth-1 kernels (13 x 96 x 96 -> "
                           "13 x 24 x 24 at 4x, as in the reference paper); `all`: D, H and W")
    latent_channels: int = Field(3, ge=1, description="channels of the latent")
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per level")
    norm_num_groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every entry of `channels`")
    kl_weight: float = Field(1e-6, ge=0, description="beta: weight of the KL term")
    recon_loss: Literal["l1", "mse"] = Field("l1", description="reconstruction loss per voxel")
    perceptual_weight: float = Field(0.0, ge=0, description="weight of the perceptual loss (needs `perceptual_network`)")
    perceptual_network: Optional[str] = Field(None, description="local TorchScript feature network for the perceptual loss")
    adversarial_weight: float = Field(0.0, ge=0, description="weight of the PatchGAN adversarial loss (non-DP stages only)")
    discriminator_channels: int = Field(16, ge=1, description="PatchGAN discriminator width")
    discriminator_layers: int = Field(2, ge=1, description="PatchGAN discriminator depth")
    discriminator_lr: float = Field(1e-4, gt=0, description="discriminator learning rate")

    @model_validator(mode="after")
    def _check(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels: expected a non-empty list of positive integers")
        if self.perceptual_weight > 0 and not self.perceptual_network:
            raise ValueError("perceptual_network: perceptual_weight > 0 needs a local TorchScript feature network "
                             "path (nothing is downloaded at run time)")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} must divide every channel count, not {bad}")
        return self


class VQVAEConfig(_Strict):
    """VQ-VAE on MONAI's VQVAE."""
    kind: Literal["vq_vae"] = "vq_vae"
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="channels per level; each level after the first halves D, H, W (H, W only with `downsample: in_plane`)")
    downsample: Literal["all", "in_plane"] = Field(
        "all", description="`in_plane`: strided layers halve H and W only, with depth-1 kernels (13 x 96 x 96 -> "
                           "13 x 24 x 24 at 4x, as in the reference paper); `all`: D, H and W")
    num_res_layers: int = Field(1, ge=1, description="residual layers per level")
    num_res_channels: Optional[list[int]] = Field(None, description="channels of the residual layers (default: `channels`)")
    num_embeddings: int = Field(256, ge=2, description="codebook size")
    embedding_dim: int = Field(4, ge=1, description="code (latent channel) dimension")
    commitment_cost: float = Field(0.25, ge=0, description="weight of the commitment loss")
    codebook: Literal["gradient", "ema"] = Field(
        "gradient", description="`gradient`: codebook learned by its loss (DP-safe); `ema`: MONAI's EMA update (non-DP only)")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="decay of the EMA codebook (codebook: ema)")
    recon_loss: Literal["l1", "mse"] = Field("l1", description="reconstruction loss per voxel")

    @model_validator(mode="after")
    def _check(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels: expected a non-empty list of positive integers")
        if self.num_res_channels is not None and len(self.num_res_channels) != len(self.channels):
            raise ValueError("num_res_channels: expected one entry per level of `channels`")
        return self


class LDMConfig(_Strict):
    """Label-conditioned (latent) diffusion model on MONAI's DiffusionModelUNet."""
    kind: Literal["ldm"] = "ldm"
    channels: list[int] = Field(default_factory=lambda: [32, 64], description="UNet channels per level")
    downsample: Literal["all", "in_plane"] = Field(
        "all", description="`in_plane`: the UNet's strided layers halve H and W only and never mix depth (the "
                           "reference LDM's in-plane convolutions; pair it with an in-plane compression model); `all`: D, H, W")
    attention_levels: Optional[list[bool]] = Field(None, description="levels with attention (default: all but the first)")
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per level")
    num_head_channels: int = Field(8, ge=1, description="channels per attention head")
    norm_num_groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every entry of `channels`")
    label_embedding_dim: int = Field(32, ge=1, description="size of each label's embedding (one token per label)")
    label_conditioning: Literal["cross_attention", "embedding", "both"] = Field(
        "cross_attention", description="how labels reach the UNet: `cross_attention` (the label tokens as context of "
                                       "the attention levels, as in the reference LDM), `embedding` (the tokens, through "
                                       "one Linear, added to the timestep embedding of every residual block), or `both`")
    label_dropout: float = Field(0.1, ge=0, le=1, description="probability of dropping all labels of a sample (classifier-free guidance)")
    num_train_timesteps: int = Field(1000, ge=2, description="DDPM steps")
    beta_schedule: Literal["linear_beta", "scaled_linear_beta"] = Field("scaled_linear_beta", description="DDPM noise schedule")
    beta_start: float = Field(0.0015, gt=0, description="first beta")
    beta_end: float = Field(0.0195, gt=0, lt=1, description="last beta")
    num_inference_steps: int = Field(50, ge=1, description="DDIM steps at sampling")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance at sampling (1: none)")
    scale_factor: Optional[float] = Field(None, gt=0, description="latent scale; null: 1.0 in DP mode or from public data")
    label_ranges: Optional[dict[str, tuple[float, float]]] = Field(
        None, description="label -> [low, high]: the label embedder maps that label's values affinely to [-1, 1] "
                          "(e.g. `{LVEDV: [50, 300], ESED: [0, 1]}`, values outside extend linearly). A declared "
                          "range, never computed from data (a data statistic would be a release outside DP); "
                          "labels not listed go through sign(x) * log1p(|x|), which flattens large values "
                          "(100 and 200 mL become 4.6 and 5.3). Keys must be in `data.labels`")

    @model_validator(mode="after")
    def _check(self):
        for name, (lo, hi) in (self.label_ranges or {}).items():
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"label_ranges.{name}: expected [low, high] with finite low < high, not [{lo}, {hi}]")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} must divide every channel count, not {bad}")
        if self.attention_levels is not None and len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels: expected one entry per level of `channels`")
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end: expected beta_end > beta_start")
        return self


ModelConfig = Annotated[Union[BetaVAEConfig, VQVAEConfig, LDMConfig], Field(discriminator="kind")]
FAMILY_CONFIGS: dict[str, type[BaseModel]] = {"beta_vae": BetaVAEConfig, "vq_vae": VQVAEConfig, "ldm": LDMConfig}


class TrainConfig(_Strict):
    """The optimisation of one trial."""
    epochs: int = Field(2, ge=1, description="passes over the training split")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (the peak, with a schedule)")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "constant", description="per optimizer step: `constant`; `cosine` (from `lr` down to 0 over the run); `onecycle` "
                                "(torch's OneCycleLR: up to `lr` over the first 30% of the steps, then cosine down)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    batch_size: int = Field(32, ge=1, description="logical batch (the expected Poisson batch in DP mode)")
    physical_batch_size: int = Field(8, ge=1, description="micro-batch actually run; memory depends on this only")
    seed: int = Field(0, description="seed of the initial weights, non-DP shuffling and the loss's own draws; DP noise and Poisson batches come from OS entropy unless `dp.reproducible`")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap on steps per epoch (`--smoke-test` sets 2)")
    finetune: Literal["all", "attention"] = Field(
        "all", description="`attention`: train only attention and label-conditioning layers (DP-LDM style fine-tuning)")
    sample_grid: int = Field(4, ge=0, description="generators: volumes drawn for the PNG grid logged at the end (0: none)")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="keep an EMA of the weights (sampling uses it); null: off")
    memory_format: Literal["default", "channels_last_3d"] = Field(
        "default", description="layout of the 3D convolution weights: `channels_last_3d` runs oneDNN's faster kernels on "
                               "CPUs (the beta-VAE's step 2x faster here); the numbers are the same either way")

    @model_validator(mode="after")
    def _check(self):
        if self.physical_batch_size > self.batch_size:
            raise ValueError(f"physical_batch_size: {self.physical_batch_size} is larger than "
                             f"batch_size {self.batch_size}; expected at most the logical batch")
        return self


class EvalConfig(_Strict):
    """Evaluation on the test split at the end of each trial (`fidelity/...`, `control/...`)."""
    enabled: bool = Field(True, description="evaluate at the end of the trial")
    n_samples: int = Field(32, ge=2, description="test volumes used (generators: as many generated with their labels)")
    feature_network: Optional[str] = Field(None, description="Frechet distance features: a local TorchScript file; null: the built-in `phantom3d` encoder (trained on public phantoms only)")
    feature_mode: Literal["volume", "slices"] = Field("volume", description="`volume`: a 3D network on whole volumes; `slices`: a 2D network (e.g. Inception-v3) on depth slices")
    slices: Optional[list[int]] = Field(None, description="`slices` mode: depth indices fed to the 2D network (default: the middle ones)")
    label_network: Optional[str] = Field(None, description="control metrics: a local TorchScript regressor volume -> labels; null: phantom measurement (phantom labels only)")
    label_network_outputs: Optional[list[str]] = Field(None, description="names of the label network's output columns (labels of `data.labels`)")
    sampling_steps: Optional[int] = Field(None, ge=1, description="DDIM steps when generating for evaluation (default: the model's `num_inference_steps`)")
    utility: bool = Field(True, description="generators: train a small 3D label regressor on the generated volumes and test it on the real test split (`utility/...`), beside the same net trained on as many real training volumes (`utility_real/...`)")
    utility_steps: int = Field(150, ge=1, description="Adam steps of each utility regressor (batch 16)")
    bootstrap: int = Field(500, ge=0, description="bootstrap resamples for the 95% intervals of FD, MMD and the control and utility scores (`<metric>_ci_low` / `_ci_high`); 0: none")

    @model_validator(mode="after")
    def _check(self):
        if self.label_network and not self.label_network_outputs:
            raise ValueError("label_network_outputs: expected the label names of the label network's output columns")
        if 0 < self.bootstrap < 100:
            raise ValueError(f"bootstrap: {self.bootstrap} resamples give no stable 95% interval; expected 0 (off) or at least 100")
        return self


class DPConfig(_Strict):
    """DP-SGD (Opacus)."""
    enabled: bool = Field(False, description="train with DP-SGD")
    noise_multiplier: Optional[float] = Field(None, gt=0, description="sigma; give this or `target_epsilon`")
    target_epsilon: Optional[float] = Field(None, gt=0, description="solve sigma so the run ends at this epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clipping bound C")
    grad_sample_mode: Literal["auto", "functorch", "hooks", "ghost", "bk"] = Field(
        "auto", description="per-sample gradients: Opacus functorch or hooks, ghost clipping, or bk (book-keeping: "
                            "one backward, trainers/book_keeping.py); auto: fastest per family")
    noise_multiplicity: int = Field(1, ge=1, description="ldm: timestep/noise draws averaged per sample before clipping")
    reproducible: bool = Field(
        False, description="debugging only: DP noise and Poisson batches from `train.seed` instead of OS entropy; "
                            "anyone who knows the seed can remove the noise, so the trial is tagged "
                            "`orchestrator.dp_release=false` and is not a DP release")

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("expected exactly one of `noise_multiplier` or `target_epsilon` when enabled")
        return self


AUDIT_MIN_CANARIES = 100


class AuditConfig(_Strict):
    """A measured lower bound on epsilon from this run's canaries (one-run audit, trainers/audit.py); never released.

    Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023."""
    canaries: int = Field(..., ge=AUDIT_MIN_CANARIES,
                          description=f"number of canaries M, each in the run with probability 1/2 (at least "
                                      f"{AUDIT_MIN_CANARIES}: 100 perfect guesses can show epsilon 2.9 at most)")
    kind: Literal["gradient", "input"] = Field(
        "gradient", description="gradient: white-box Dirac gradient canaries scored by their summed noisy update; "
                                "input: black-box crafted volumes (random 0/1 voxels) trained as records and scored by "
                                "the final model's loss (at most half as many canaries as training records)")


class ParamSpec(_Strict):
    """One searched parameter: `values`, `value`, or `distribution` with `min`/`max`."""
    values: Optional[list[Any]] = None
    value: Any = None
    distribution: Optional[Literal["uniform", "log_uniform", "int_uniform"]] = None
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _check(self):
        forms = [self.values is not None, "value" in self.model_fields_set, self.distribution is not None]
        if sum(forms) != 1:
            raise ValueError("expected exactly one of `values`, `value`, or `distribution` (with `min`/`max`)")
        if self.values is not None and not self.values:
            raise ValueError("values: expected a non-empty list")
        if self.distribution is not None:
            if self.min is None or self.max is None:
                raise ValueError("distribution: expected `min` and `max`")
            if not self.min < self.max:
                raise ValueError(f"min: expected min < max, got {self.min} >= {self.max}")
            if self.distribution == "log_uniform" and self.min <= 0:
                raise ValueError("min: log_uniform needs min > 0")
        elif self.min is not None or self.max is not None:
            raise ValueError("min/max: only valid with `distribution`")
        return self

    def candidates(self) -> list[Any]:
        """Values to validate against the stage schema."""
        if self.values is not None:
            return list(self.values)
        if self.distribution is not None:
            lo, hi = self.min, self.max
            return [int(lo), int(hi)] if self.distribution == "int_uniform" else [lo, hi]
        return [self.value]


class RandomCount(_Strict):
    """A random number of trials (Papernot & Steinke): only then is the cost of picking the best small."""
    distribution: Literal["poisson", "truncated_negative_binomial"] = Field(..., description="law of the number of trials")
    mean: float = Field(..., gt=0, description="expected number of trials")
    shape: Optional[float] = Field(None, gt=-1, description="truncated_negative_binomial: eta (> -1; 1: geometric)")

    @model_validator(mode="after")
    def _check(self):
        if self.distribution == "truncated_negative_binomial" and self.shape is None:
            raise ValueError("shape: truncated_negative_binomial needs `shape` (eta > -1, e.g. 1)")
        if self.distribution == "poisson" and self.shape is not None:
            raise ValueError("shape: only used with truncated_negative_binomial")
        if self.distribution == "truncated_negative_binomial" and self.mean <= 1:
            raise ValueError("mean: a truncated negative binomial count is at least 1; expected mean > 1")
        return self


class SelectDPConfig(_Strict):
    """`search.select_on: dp`: the selection metric as a Gaussian mechanism on the validation split."""
    clip: float = Field(..., gt=0, description="each validation sample's loss is clipped to [0, clip] (the sensitivity of the sum)")
    noise_multiplier: float = Field(..., gt=0, description="sigma: N(0, (sigma * clip)^2) is added to the clipped sum, once per trial")


class SearchConfig(_Strict):
    """What Ray Tune varies and how it picks the best trial."""
    method: Literal["grid", "random", "optuna"] = Field("grid", description="search algorithm")
    metric: str = Field("val/loss", description="metric that ranks trials")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher `metric` is better")
    select_on: Literal["private", "public", "dp"] = Field(
        "private", description="what ranks trials: `private` (the metric on this stage's own splits; unbounded "
                               "privacy loss for those people, said in the ledger), `public` (the metric on "
                               "`select_data`, a public dataset), `dp` (a noisy validation loss, see `select_dp`)")
    select_data: Optional[dict[str, Any]] = Field(
        None, description="select_on public: overrides of the top-level `data` naming a public dataset "
                          "(`private: false`) with the same shape and labels")
    select_dp: Optional[SelectDPConfig] = Field(None, description="select_on dp: clip bound and noise multiplier")
    num_samples: Union[Annotated[int, Field(ge=1)], RandomCount] = Field(
        1, description="grid: repeats of the grid; random/optuna: number of trials, or `{distribution: poisson, mean: M}` "
                       "(or truncated_negative_binomial with `shape`) for a random count drawn once per launch")
    parameters: dict[str, ParamSpec] = Field(default_factory=dict, description="dotted path in this stage -> values")

    @model_validator(mode="after")
    def _check(self):
        if self.select_on == "public" and self.select_data is None:
            raise ValueError("select_data: select_on public needs a public dataset, e.g. "
                             "{root: data/public, private: false}")
        if self.select_on != "public" and self.select_data is not None:
            raise ValueError("select_data: only used with select_on: public")
        if self.select_on == "dp":
            if self.select_dp is None:
                raise ValueError("select_dp: select_on dp needs {clip: C, noise_multiplier: SIGMA}")
            if not self.metric.startswith("val/"):
                raise ValueError(f"metric: select_on dp releases a noisy mean of per-sample validation losses; "
                                 f"expected a val/ metric, not {self.metric!r}")
        elif self.select_dp is not None:
            raise ValueError("select_dp: only used with select_on: dp")
        if self.method == "grid":
            for path, spec in self.parameters.items():
                if spec.distribution is not None:
                    raise ValueError(f"parameters.{path}: grid search needs `values` or `value`, "
                                     "not a distribution (use method: random or optuna)")
        return self


class StageConfig(_Strict):
    """One stage of the study: a model family trained by a sweep of trials."""
    name: str = Field(..., min_length=1, description="stage name (MLflow tag `orchestrator.stage`)")
    needs: Optional[str] = Field(None, description="stage whose selected checkpoint this stage uses")
    select: Optional[Literal["best", "each"]] = Field(None, description="with `needs`: best trial, or one sweep per upstream trial")
    init_from: Optional[str] = Field(None, description="stage whose selected weights initialise this one (its raw weights, not its EMA)")
    data: Optional[dict[str, Any]] = Field(None, description="overrides of the top-level `data` for this stage")
    model: ModelConfig = Field(default_factory=BetaVAEConfig, description="the model family and its size")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation")
    dp: DPConfig = Field(default_factory=DPConfig, description="DP-SGD settings")
    search: SearchConfig = Field(default_factory=SearchConfig, description="what Tune varies")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation on the test split")
    privacy: Optional[StagePrivacyConfig] = Field(None, description="this stage's unit of privacy, e.g. {unit: subject}")
    audit: Optional[AuditConfig] = Field(None, description="DP stages only: measure a lower bound on epsilon with "
                                                           "canaries (the trial is tagged `orchestrator.audit=true`, "
                                                           "never selected, never a released model)")

    @model_validator(mode="after")
    def _check(self):
        if self.audit is not None and not self.dp.enabled:
            raise ValueError("audit: an audit measures DP-SGD's privacy; expected dp.enabled: true on this stage")
        if "privacy.unit" in self.search.parameters:
            raise ValueError("search.parameters.privacy.unit: the unit of privacy is not a hyperparameter; expected "
                             "one stage per unit (`privacy: {unit: subject}` on the stage)")
        if self.privacy is not None and self.privacy.unit == "subject" and self.dp.grad_sample_mode == "ghost":
            raise ValueError("dp.grad_sample_mode: ghost clipping computes one norm per volume, not per subject; "
                             "expected auto, bk, functorch or hooks with privacy.unit subject")
        if self.select is not None and self.needs is None:
            raise ValueError("select: only meaningful with `needs`")
        if self.dp.enabled and self.model.kind == "vq_vae" and self.model.codebook == "ema":
            # MONAI's EMA codebook is updated from raw encoder outputs outside clipping and noise.
            raise ValueError("model.codebook: `ema` updates the codebook from private data outside DP-SGD; "
                             "expected `gradient` when dp.enabled is true")
        if self.dp.enabled and getattr(self.model, "adversarial_weight", 0) > 0:
            raise ValueError("model.adversarial_weight: the discriminator would learn from the private images outside "
                             "DP-SGD and feed the generator's loss; expected 0 when dp.enabled is true")
        if self.dp.noise_multiplicity > 1 and self.dp.grad_sample_mode == "ghost":
            raise ValueError("dp.grad_sample_mode: ghost clipping computes one norm per draw, not per sample; "
                             "expected auto, functorch or hooks with noise_multiplicity > 1")
        if self.dp.noise_multiplicity > 1 and self.model.kind != "ldm":
            raise ValueError(f"dp.noise_multiplicity: only diffusion models (ldm) draw noise per sample; "
                             f"expected 1 for {self.model.kind}")
        if self.train.finetune == "attention" and self.model.kind != "ldm":
            raise ValueError(f"train.finetune: `attention` needs an ldm model, not {self.model.kind}")
        return self


class SweepConfig(_Strict):
    """A whole study."""
    name: str = Field(..., min_length=1, description="MLflow experiment name and Ray run name")
    output: str = Field("runs/demo", description="holds mlflow.db, Ray results and checkpoints (relative: to the working directory)")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset every stage uses unless it overrides it")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="delta and accountant")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="where trials run")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow store")
    stages: list[StageConfig] = Field(..., min_length=1, description="the stages, run in `needs` order")

    # Set by load_sweep: the folder relative paths are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stages: duplicate stage name {sorted(dup)[0]!r}")
        for s in self.stages:
            for key in ("needs", "init_from"):
                ref = getattr(s, key)
                if ref is not None and ref not in names:
                    hint = _did_you_mean(ref, names)
                    raise ValueError(f"stages[{s.name}].{key}: unknown stage {ref!r}{hint}")
                if ref == s.name:
                    raise ValueError(f"stages[{s.name}].{key}: a stage cannot depend on itself")
        stage_order(self.stages)  # raises on cycles
        by_name = {s.name: s for s in self.stages}
        for s in self.stages:
            if self.stage_unit(s) == "subject" and s.dp.grad_sample_mode == "ghost":
                raise ValueError(f"stages[{s.name}].dp.grad_sample_mode: ghost clipping computes one norm per volume, "
                                 "not per subject; expected auto, bk, functorch or hooks with privacy.unit subject")
            if s.needs is not None:
                up = by_name[s.needs]
                if s.model.kind != "ldm":
                    raise ValueError(f"stages[{s.name}].needs: only an ldm stage uses a compression model; "
                                     f"this stage trains {s.model.kind}")
                if up.model.kind not in ("beta_vae", "vq_vae"):
                    raise ValueError(f"stages[{s.name}].needs: stage {up.name!r} trains {up.model.kind}; "
                                     "expected a compression model (beta_vae or vq_vae)")
            for key in ("needs", "init_from"):
                ref = getattr(s, key)
                if ref is not None and by_name[ref].audit is not None:
                    raise ValueError(f"stages[{s.name}].{key}: stage {ref!r} is audited (trained with canaries) and "
                                     "is never selected; audit a stage that no other stage builds on")
            if s.init_from is not None and by_name[s.init_from].model.kind != s.model.kind:
                raise ValueError(f"stages[{s.name}].init_from: stage {s.init_from!r} trains "
                                 f"{by_name[s.init_from].model.kind}; expected the same model kind ({s.model.kind})")
            # model options the initialising weights were trained for, and must keep
            for key, why in (("downsample", "the weights only fit the same downsampling"),
                             ("label_ranges", "the label embedder's weights only fit the label map they were trained with")):
                if s.init_from is None:
                    break
                theirs, ours = getattr(by_name[s.init_from].model, key, None), getattr(s.model, key, None)
                if theirs != ours:
                    raise ValueError(f"stages[{s.name}].init_from: stage {s.init_from!r} has model.{key} "
                                     f"{theirs!r}, this stage {ours!r}; {why}")
            ranges = getattr(s.model, "label_ranges", None) or {}
            labels = list(self.stage_data(s).labels) if ranges else []
            for name in ranges:
                if name not in labels:
                    raise ValueError(f"stages[{s.name}].model.label_ranges.{name}: not a label of this stage's data; "
                                     f"expected one of {labels}{_did_you_mean(name, labels)}")
        return self

    # --- resolved views -------------------------------------------------------------
    def stage_unit(self, stage: StageConfig) -> str:
        """The unit of privacy of a stage: its own `privacy.unit`, else the sweep's."""
        return (stage.privacy.unit if stage.privacy is not None else None) or self.privacy.unit

    def stage_data(self, stage: StageConfig) -> DataConfig:
        merged = self.data.model_dump()
        merged.update(stage.data or {})
        return DataConfig.model_validate(merged)

    def select_data(self, stage: StageConfig) -> Optional[DataConfig]:
        """select_on public: the public dataset that ranks the stage's trials."""
        if stage.search.select_data is None:
            return None
        merged = self.stage_data(stage).model_dump()
        merged.update(stage.search.select_data)
        return DataConfig.model_validate(merged)

    def resolve(self, path: str) -> Path:
        """A path made absolute and real (symlinks and `..` resolved): two spellings of one
        folder are one dataset in the privacy ledger."""
        p = Path(path).expanduser()
        return (p if p.is_absolute() else self.base_dir / p).resolve()

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output)


def stage_order(stages: list[StageConfig]) -> list[StageConfig]:
    """Stages sorted so every stage comes after what it `needs` or is `init_from`."""
    by_name = {s.name: s for s in stages}
    order, state = [], {}

    def visit(s: StageConfig, chain: list[str]):
        if state.get(s.name) == "done":
            return
        if state.get(s.name) == "visiting":
            raise ValueError(f"stages: dependency cycle {' -> '.join(chain + [s.name])}")
        state[s.name] = "visiting"
        for ref in (s.needs, s.init_from):
            if ref in by_name:
                visit(by_name[ref], chain + [s.name])
        state[s.name] = "done"
        order.append(s)

    for s in stages:
        visit(s, [])
    return order


# --- dotted paths -------------------------------------------------------------------
def get_path(tree: dict, path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node[part]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- errors -------------------------------------------------------------------------
def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def search_combinations(stage: StageConfig, limit: int):
    """(searched values, trained stage config as a dict) for each combination of the
    candidate values of `search.parameters`, at most `limit` of them."""
    base = stage.model_dump(exclude={"search", "name", "needs", "select", "init_from", "data"})
    specs = stage.search.parameters
    combos = itertools.product(*[spec.candidates() for spec in specs.values()])
    for values in itertools.islice(combos, limit):
        trial = copy.deepcopy(base)
        for path, value in zip(specs, values):
            set_path(trial, path, value)
        yield dict(zip(specs, values)), trial


if __name__ == "__main__":   # `python -m orchestrator.config SWEEP.yaml | --reference`
    from orchestrator.sweep_file import main

    raise SystemExit(main())
