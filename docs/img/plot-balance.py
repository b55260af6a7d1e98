#!/usr/bin/python3
"""Charts of docs/experiments.md from the runs' telemetry (JSONL of `moescope-cli train --telemetry`).

usage: docs/img/plot-balance.py RUN_DIR OUT_DIR
RUN_DIR holds <mode>.jsonl for aux-free-g1e-2, aux-free, aux-loss, seq-aux, none.
"""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, out = sys.argv[1], sys.argv[2]
modes = [("aux-free-g1e-2", "aux-loss-free, gamma 1e-2"), ("aux-free", "aux-loss-free, gamma 1e-3"),
         ("aux-loss", "aux loss, alpha 1e-2"), ("seq-aux", "sequence-wise aux loss, alpha 1e-2"),
         ("none", "no balancing")]

def load(name):
    tr, ev, bias = [], [], {}
    for line in open(os.path.join(run, name + ".jsonl")):
        r = json.loads(line)
        if r["type"] == "train": tr.append(r)
        elif r["type"] == "eval": ev.append(r)
        elif r["type"] == "bias" and r["layer"] == 1: bias[r["step"]] = r["bias"]
    return tr, ev, bias

def smooth(v, n=10):
    out, acc = [], []
    for x in v:
        acc.append(x); acc = acc[-n:]
        out.append(sum(acc) / len(acc))
    return out

data = {m: load(m) for m, _ in modes if os.path.exists(os.path.join(run, m + ".jsonl"))}
fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
for m, label in modes:
    if m not in data: continue
    tr, ev, _ = data[m]
    ax[0].plot([r["step"] for r in tr], smooth([r["maxvio_batch"] for r in tr]), label=label)
    ax[1].plot([r["step"] for r in ev], [r["maxvio_global"] for r in ev], marker=".", label=label)
    ax[2].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], marker=".", label=label)
ax[0].set_title("MaxVio of the batch (mean over MoE layers, 10-step average)")
ax[1].set_title("MaxVio over the validation set (global)")
ax[2].set_title("validation loss (nats/token)")
ax[2].set_ylim(2.3, 3.0)
for a in ax:
    a.set_xlabel("step"); a.grid(alpha=0.3)
ax[0].set_yscale("log"); ax[1].set_yscale("log")
ax[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, "balance-maxvio-loss.png"), dpi=90)

fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for a, m in zip(ax, ["aux-free-g1e-2", "aux-free"]):
    if m not in data: continue
    bias = data[m][2]
    steps = sorted(bias)
    E = len(bias[steps[0]])
    for e in range(E):
        a.plot(steps, [bias[s][e] for s in steps], lw=1)
    a.set_title(f"router bias of layer 1, 16 experts ({dict(modes)[m]})")
    a.set_xlabel("step"); a.grid(alpha=0.3)
ax[0].set_ylabel("e_score_correction_bias")
fig.tight_layout()
fig.savefig(os.path.join(out, "balance-bias-drift.png"), dpi=90)
