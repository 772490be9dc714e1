"""What a generator stage needs besides the training loop: the latent scale factor (from
somewhere that is not private data, in DP mode), the fine-tuning parameter subset, and the
sample grid a trial leaves for MLflow."""
from __future__ import annotations

from typing import Optional

import torch

from orchestrator.config import DataConfig, StageConfig


def latent_std(compression, data: DataConfig, device, cache_dir=None, n: int = 32) -> float:
    from trainers.data import VolumeDataset, validate_dataset

    # the launch validated this data already: the cache spares re-reading every volume
    index = validate_dataset(data.root, data.labels, tuple(data.shape), allow_pickle=data.allow_pickle,
                             cache_dir=cache_dir)
    ds = VolumeDataset(index.splits["training"][:n], len(data.labels), allow_pickle=data.allow_pickle, preload=False)
    with torch.no_grad():
        z = torch.cat([compression.encode_latent(ds[i]["image"][None].to(device)) for i in range(len(ds))])
    return float(z.std())


def resolve_latent_scale(stage: StageConfig, compression, meta: dict, device,
                         init_state: Optional[dict] = None) -> tuple[Optional[float], Optional[str]]:
    """(scale factor, where it came from). The reference code computed it from the first
    private batch, outside DP; here, in DP mode, it never comes from private data."""
    if stage.model.kind != "ldm":
        return None, None
    if compression is None:
        return 1.0, "image space (no compression model)"
    if stage.model.scale_factor is not None:
        return float(stage.model.scale_factor), "config"
    if init_state is not None and init_state.get("scale_factor") is not None:
        # Fine-tuning must keep the latent scale the pretrained weights were trained with.
        return float(init_state["scale_factor"]), f"init_from checkpoint ({init_state.get('scale_source')})"
    if meta.get("scale_data"):
        data = DataConfig.model_validate(meta["scale_data"])
        return 1.0 / latent_std(compression, data, device, meta.get("cache_dir")), f"public data {data.root}"
    if not stage.dp.enabled:
        data = DataConfig.model_validate(meta["data"])
        return 1.0 / latent_std(compression, data, device, meta.get("cache_dir")), "training data (non-DP stage)"
    return 1.0, "default 1.0 (DP stage and no public data: never computed from private data)"


# "embedder" and "label_time": the label embedder and its path into the timestep embedding
ATTENTION_KEYS = ("attn", "attention", "transformer", "label", "embedder")


def freeze_all_but_attention(model: torch.nn.Module) -> int:
    """Train only attention and label-conditioning layers (fine-tuning as in DP-LDM,
    Lyu et al. 2023); returns the number of trainable parameters left."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in ATTENTION_KEYS))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError("train.finetune: attention leaves no trainable parameter in this model "
                         "(it has no attention or label-conditioning layers)")
    return n


def write_sample_grid(adapter, test_set, n: int, path: str, show_real: bool) -> None:
    """Mid slices of generated volumes, beside real test volumes with the same labels.

    Real volumes and their labels are shown only for public data. For private data, DP or
    not, no real volume and no real label reaches the picture (the generated volumes are
    drawn with all labels unknown): the picture is logged to MLflow, which may be shared
    more widely than the data, and a non-DP model's weights are no excuse to publish pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(test_set)) if show_real else n
    if show_real:
        items = [test_set[i] for i in range(n)]
        labels = torch.stack([it["labels"] for it in items])
        mask = torch.stack([it["label_mask"] for it in items])
        real = torch.stack([it["image"] for it in items])
    else:
        labels = torch.zeros(n, adapter.n_labels)
        mask = torch.zeros(n, adapter.n_labels, dtype=torch.bool)
        real = None
    device = next(adapter.network.parameters()).device
    with torch.no_grad():
        fake = adapter.sample(labels.to(device), mask.to(device), generator=torch.Generator().manual_seed(0)).cpu()
    rows = [("generated", fake)] + ([("real", real)] if real is not None else [])
    fig, axes = plt.subplots(len(rows), n, figsize=(2 * n, 2 * len(rows) + 0.4), squeeze=False)
    for r, (title, vols) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            vol = vols[c, 0].numpy()
            ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title)
    fig.suptitle("mid slices" + ("" if show_real else " (labels unknown; private data not shown)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
