"""Score one trained generator of a privacy_cost run again, as the trial evaluation does (the
same 300 private test volumes, the same sampling seed), at other guidance scales, or with the
raw instead of the EMA weights (README, "What privacy costs", DP recipes):

    python docs/privacy_cost/rescore.py runs/pc_dp_recipes pretrained_nondp --guidance 3,4,5,6
    python docs/privacy_cost/rescore.py runs/pc_dp_recipes ldm_pretrain --raw

`ldm_pretrain` here is the public pretrained LDM scored on the PRIVATE test split: the point
every DP fine-tune starts from (`init_from` loads its raw weights, not its EMA). Prints one
JSON line per guidance scale: FD (phantom3d features), ED/ES accuracy, LVEDV r, r_mean.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orchestrator.tracking import client_for  # noqa: E402
from trainers.checkpoints import load_generator  # noqa: E402
from trainers.data import VolumeDataset  # noqa: E402
from trainers.evaluation import control_scores, frechet_distance  # noqa: E402
from trainers.features import load_feature_extractor, load_label_measurer  # noqa: E402
from trainers.trial_eval import EVAL_SEED  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("output")
ap.add_argument("stage")
ap.add_argument("--guidance", default="3")
ap.add_argument("--raw", action="store_true", help="the raw weights, not the EMA ones")
ap.add_argument("--data", default="data/phantom32_pc", help="the private data root")
ap.add_argument("--n", type=int, default=300)
args = ap.parse_args()

client = client_for(f"sqlite:///{Path(args.output).resolve() / 'mlflow.db'}")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        if r.data.tags.get("orchestrator.stage") == args.stage and "orchestrator.checkpoint" in r.data.tags]
if len(runs) != 1:
    raise SystemExit(f"{args.stage}: {len(runs)} finished trials with a checkpoint; expected one")
adapter, state = load_generator(runs[0].data.tags["orchestrator.checkpoint"])
if args.raw:
    adapter.network.load_state_dict(state["model"])
root = Path(args.data)
ds = VolumeDataset([root / p for p in np.load(root / "testing.npy")][:args.n], len(state["labels"]))
items = [ds[i] for i in range(len(ds))]
real = torch.stack([it["image"] for it in items])
labels = torch.stack([it["labels"] for it in items])
extractor = load_feature_extractor(None, "volume", None, device="cpu")
measurer = load_label_measurer(None, list(state["labels"]))
f_real = extractor(real)
requested = {n: labels[:, j].numpy().astype(float) for j, n in enumerate(state["labels"])}
for w in (float(x) for x in args.guidance.split(",")):
    gen = torch.Generator().manual_seed(EVAL_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        fake = torch.cat([adapter.sample(labels[i:i + 50], generator=gen, guidance_scale=w)
                          for i in range(0, len(real), 50)]).clamp(0, 1)
    measured = measurer(fake)
    s = control_scores({k: v for k, v in requested.items() if k in measured}, measured)
    print(json.dumps({"stage": args.stage, "weights": "raw" if args.raw else "ema", "guidance": w,
                      "fd": round(frechet_distance(f_real, extractor(fake)), 1),
                      "ed_es_accuracy": round(s.get("control/ed_es_accuracy", float("nan")), 3),
                      "LVEDV_r": round(s.get("control/LVEDV/r", float("nan")), 3),
                      "r_mean": round(s["control/r_mean"], 3)}), flush=True)
