"""What label smoothing does to a classifier, measured with lsce.

Trains the same small MLP (same initial weights, same mini-batch order) on
scikit-learn's bundled handwritten-digits data with ``lsce.CrossEntropyLoss`` at
several label-smoothing values ε (0 and 0.1 at least), over several seeds, and
reports on the test split, as mean ± std over the seeds:

- accuracy and negative log-likelihood (NLL);
- the mean confidence (max softmax probability) of correct and of wrong predictions;
- the expected calibration error (ECE; 15 equal-width bins, L1, as Guo et al.
  2017), computed by torchmetrics;
- the same for the ε = 0 model after temperature scaling, the temperature fitted
  on a held-out validation split (the alternative Müller et al. 2019 compare with);
- how tight the classes cluster in the penultimate layer (mean distance to the
  class mean / mean distance between class means).

Pictures (PNG): reliability diagrams, confidence histograms, the penultimate-layer
projection of Müller, Kornblith & Hinton (2019, section 2) for ε = 0 and 0.1, and
the metrics against ε.

    python examples/label_smoothing_effects.py                 # full run (a few minutes on CPU)
    python examples/label_smoothing_effects.py --fast --out /tmp/ls   # one seed, few epochs

Needs scikit-learn, torchmetrics and matplotlib: ``pip install "lsce[examples]"``.
Everything runs offline: the digits data ship inside scikit-learn.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torchmetrics.functional.classification import multiclass_calibration_error
except ImportError as exc:  # pragma: no cover - exercised by the test's message only
    sys.exit(f"label_smoothing_effects.py needs scikit-learn, torchmetrics and matplotlib "
             f"({exc}); install them with: pip install \"lsce[examples]\"")

import lsce

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared benchmarks/measure.py
from measure import Clock  # noqa: E402

NUM_CLASSES = 10
N_BINS = 15
# Names of the table's rows, in order (the test parses the table by these names).
ROWS = [
    ("accuracy", "test accuracy"),
    ("nll", "test NLL"),
    ("conf_correct", "mean confidence, correct"),
    ("conf_wrong", "mean confidence, wrong"),
    ("ece", "ECE (15 bins, L1)"),
    ("cluster_ratio", "penultimate within/between"),
    ("temperature", "temperature T"),
]


# ----------------------------------------------------------------------------- data and model

def load_splits(split_seed: int = 0):
    """Digits (1797 8×8 images, 10 classes), pixel values scaled to [0, 1], split
    stratified into train / validation / test = 55 % / 15 % / 30 %, the same split
    for every seed so that the seeds vary the training only."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.30, stratify=y, random_state=split_seed)
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=0.15 / 0.70, stratify=y_rest, random_state=split_seed)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return {name: (t(Xs, torch.float32), t(ys, torch.int64)) for name, Xs, ys in
            [("train", X_train, y_train), ("val", X_val, y_val), ("test", X_test, y_test)]}


class MLP(nn.Module):
    """64 → widths[0] → … → widths[-1] (the penultimate layer, after ReLU) → 10 logits;
    by default 64 → 128 → 64 → 10."""

    def __init__(self, widths=(128, 64)):
        super().__init__()
        layers, fan_in = [], 64
        for w in widths:
            layers += [nn.Linear(fan_in, w), nn.ReLU()]
            fan_in = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def fit(model: MLP, X, loss, *, seed: int, epochs: int, batch_size: int, lr: float, after_epoch=None) -> MLP:
    """Adam on ``loss(model(X[idx]), idx)`` over mini-batches of row indices `idx`,
    their order drawn from `seed` (the same for every model of a seed, so that
    models of one seed differ by their loss alone); ``after_epoch(model, epoch)``,
    if given, is called after each epoch (epochs counted from 1)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(10_000 + seed)
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(X), generator=order)
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss(model(X[idx]), idx).backward()
            opt.step()
        if after_epoch is not None:
            model.eval()
            after_epoch(model, epoch)
            model.train()
    model.eval()
    return model


def train(init_state, data, eps: float, *, seed: int, epochs: int, batch_size: int, lr: float) -> MLP:
    """The default MLP from `init_state`, trained by :func:`fit` on
    lsce.CrossEntropyLoss(label_smoothing=eps)."""
    model = MLP()
    model.load_state_dict(init_state)
    crit = lsce.CrossEntropyLoss(label_smoothing=eps)
    X, y = data["train"]
    return fit(model, X, lambda out, idx: crit(out, y[idx]), seed=seed, epochs=epochs, batch_size=batch_size, lr=lr)


@torch.no_grad()
def forward_all(model: MLP, X):
    feats = model.body(X)
    return feats, model.head(feats)


def fit_temperature(logits, target) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017),
    by L-BFGS on log T, with lsce.cross_entropy as the NLL."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = lsce.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


# ----------------------------------------------------------------------------- metrics

def cluster_ratio(feats, target) -> float:
    """Mean distance of an example to its class mean, divided by the mean distance
    between two class means (penultimate layer, all classes): lower = tighter."""
    means = torch.stack([feats[target == k].mean(0) for k in range(NUM_CLASSES)])
    within = torch.stack([(feats[target == k] - means[k]).norm(dim=1).mean() for k in range(NUM_CLASSES)]).mean()
    d = torch.cdist(means, means)
    between = d[~torch.eye(NUM_CLASSES, dtype=torch.bool)].mean()
    return float(within / between)


def metrics(logits, target, feats) -> dict:
    prob = logits.double().softmax(1)
    conf, pred = prob.max(1)
    correct = pred == target
    return {
        "accuracy": float(correct.double().mean()),
        "nll": float(lsce.cross_entropy(logits.double(), target)),
        "conf_correct": float(conf[correct].mean()) if correct.any() else math.nan,
        "conf_wrong": float(conf[~correct].mean()) if (~correct).any() else math.nan,
        "ece": float(multiclass_calibration_error(prob.float(), target, num_classes=NUM_CLASSES,
                                                  n_bins=N_BINS, norm="l1")),
        "cluster_ratio": cluster_ratio(feats, target),
    }


# ----------------------------------------------------------------------------- the experiment

def col_name(eps: float, ts: bool = False) -> str:
    return f"ε={eps:g}" + (" + TS" if ts else "")


def run(args):
    torch.set_num_threads(args.threads)
    data = load_splits()
    Xte, yte = data["test"]
    cols = [col_name(0.0), col_name(0.0, ts=True)] + [col_name(e) for e in args.eps if e != 0.0]
    per_seed = {c: [] for c in cols}           # column → list of metric dicts
    pooled = {c: [] for c in cols}             # column → list of test logits (for the pictures)
    kept = {}                                  # seed-0 models for the projection picture
    clock = Clock()
    t0 = clock.now()
    for s in range(args.seeds):
        seed = args.seed0 + s
        torch.manual_seed(seed)
        init_state = copy.deepcopy(MLP().state_dict())
        for eps in args.eps:
            model = train(init_state, data, eps, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
            feats, logits = forward_all(model, Xte)
            m = metrics(logits, yte, feats)
            m["temperature"] = math.nan
            per_seed[col_name(eps)].append(m)
            pooled[col_name(eps)].append(logits)
            if eps == 0.0:
                _, val_logits = forward_all(model, data["val"][0])
                T = fit_temperature(val_logits, data["val"][1])
                mt = metrics(logits / T, yte, feats)
                mt["temperature"] = T
                per_seed[col_name(0.0, ts=True)].append(mt)
                pooled[col_name(0.0, ts=True)].append(logits / T)
            if s == 0:
                kept[eps] = model
        print(f"seed {seed}: trained {len(args.eps)} models ({clock.since(t0):.1f} s so far)",
              file=sys.stderr, flush=True)
    return data, cols, per_seed, {c: torch.cat(v) for c, v in pooled.items()}, kept


def fmt(values) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def tables(cols, per_seed, n_seeds: int) -> str:
    head = f"| test split, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''} | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt([m[key] for m in per_seed[c]]) for c in cols) + " |")
    out = "\n".join(lines)
    # Paired by seed: each column minus ε = 0 of the same seed (same init, same data order).
    dcols = cols[1:]
    lines = ["| difference to ε=0, same seed | " + " | ".join(dcols) + " |", "|" + "---|" * (len(dcols) + 1)]
    base = per_seed[cols[0]]
    for key, label in ROWS:
        if key in ("temperature",):
            continue
        lines.append(f"| {label} | " + " | ".join(
            fmt([m[key] - b[key] for m, b in zip(per_seed[c], base)]) for c in dcols) + " |")
    return out + "\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- pictures

def reliability(ax, logits, target, title):
    prob = logits.double().softmax(1)
    conf, pred = prob.max(1)
    correct = (pred == target).double()
    edges = np.linspace(0, 1, N_BINS + 1)
    b = np.clip(np.digitize(conf.numpy(), edges[1:-1], right=True), 0, N_BINS - 1)
    acc = np.array([correct.numpy()[b == i].mean() if (b == i).any() else np.nan for i in range(N_BINS)])
    avg = np.array([conf.numpy()[b == i].mean() if (b == i).any() else np.nan for i in range(N_BINS)])
    cnt = np.bincount(b, minlength=N_BINS)
    centers = (edges[:-1] + edges[1:]) / 2
    w = edges[1] - edges[0]
    ok = cnt > 0
    ax.bar(centers[ok], acc[ok], width=w, edgecolor="black", color="tab:blue", label="accuracy in bin")
    ax.bar(centers[ok], avg[ok] - acc[ok], bottom=acc[ok], width=w, edgecolor="tab:red", color="tab:red",
           alpha=0.3, hatch="//",
           label="gap to mean confidence in bin (red: over-confident; purple, inside the bar: under-confident)")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.text(0.01, 1.035, "n:", ha="left", va="bottom", fontsize=6.5)
    for c, n in zip(centers[ok], cnt[ok]):
        ax.text(c, 1.015, str(n), ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.5)
    ece = float(multiclass_calibration_error(prob.float(), target, num_classes=NUM_CLASSES, n_bins=N_BINS, norm="l1"))
    ax.set(xlim=(0, 1), ylim=(0, 1.16), yticks=np.linspace(0, 1, 6), xlabel="confidence (max softmax)",
           title=f"{title}\nECE of the pooled predictions = {ece:.4f}")
    ax.set_aspect("equal")


def plot_reliability(path, pooled, target, cols, n_seeds):
    show = [c for c in cols if c in (col_name(0.0), col_name(0.0, ts=True), col_name(0.1))]
    fig, axes = plt.subplots(1, len(show), figsize=(4.2 * len(show), 4.6), constrained_layout=True)
    for ax, c in zip(np.atleast_1d(axes), show):
        reliability(ax, pooled[c], target.repeat(n_seeds), c)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    fig.suptitle(f"Reliability diagrams, digits test split, {N_BINS} bins, pooled over {n_seeds} seed(s); "
                 "n = examples per bin", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confidence(path, pooled, target, cols, n_seeds):
    show = [c for c in cols if c in (col_name(0.0), col_name(0.0, ts=True), col_name(0.1))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    bins = np.linspace(0, 1, 41)
    tgt = target.repeat(n_seeds)
    for c, color in zip(show, ["tab:blue", "tab:green", "tab:orange"]):
        conf, pred = pooled[c].double().softmax(1).max(1)
        ok = pred == tgt
        for ax, mask in zip(axes, [ok, ~ok]):
            ax.hist(conf[mask].numpy(), bins=bins, histtype="step", lw=1.8, color=color,
                    label=f"{c} (n={int(mask.sum())})")
    for ax, what, scale in zip(axes, ["correct", "wrong"], ["log", "linear"]):
        ax.set(yscale=scale, xlabel="confidence (max softmax probability)", ylabel="test examples",
               title=f"{what} predictions" + (" (log scale)" if scale == "log" else ""), xlim=(0, 1.02))
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Confidence histograms, digits test split, pooled over {n_seeds} seed(s)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plane_basis(templates):
    """Orthonormal basis (H × 2) of the plane through three templates (rows of the
    last layer's weight), Müller et al. 2019, section 2."""
    a, b, c = templates.double()
    q, _ = torch.linalg.qr(torch.stack([b - a, c - a], dim=1))
    return q


def plot_projection(path, kept, data, classes):
    """Müller et al.'s Figure 1 for one triple of classes: rows train / test split,
    columns ε = 0 / ε = 0.1 (seed 0's models)."""
    colors = ["tab:blue", "tab:orange", "tab:green"]
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.6), constrained_layout=True)
    for j, eps in enumerate([0.0, 0.1]):
        model = kept[eps]
        basis = plane_basis(model.head.weight.detach()[list(classes)])
        for i, split in enumerate(["train", "test"]):
            X, y = data[split]
            feats, _ = forward_all(model, X)
            ax = axes[i, j]
            for k, col in zip(classes, colors):
                p = feats[y == k].double() @ basis
                ax.scatter(p[:, 0], p[:, 1], s=9, alpha=0.6, color=col, label=f"digit {k}")
            ax.set(title=f"ε = {eps:g}, {split} split", xlabel="basis vector 1", ylabel="basis vector 2")
            ax.legend(fontsize=8, markerscale=2)
    fig.suptitle(f"Penultimate-layer activations of digits {classes} projected on the plane through\n"
                 "their three class templates (Müller et al. 2019), seed 0", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path, eps_list, per_seed, n_seeds):
    keys = [("accuracy", "test accuracy"), ("nll", "test NLL"), ("ece", "ECE (15 bins)"),
            ("conf_wrong", "mean confidence, wrong")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), constrained_layout=True)
    for ax, (key, label) in zip(axes, keys):
        m = np.array([np.nanmean([r[key] for r in per_seed[col_name(e)]]) for e in eps_list])
        s = np.array([np.nanstd([r[key] for r in per_seed[col_name(e)]], ddof=1) if n_seeds > 1 else 0.0
                      for e in eps_list])
        ax.errorbar(eps_list, m, yerr=s, marker="o", capsize=3, label="lsce, label smoothing ε")
        ts = [r[key] for r in per_seed[col_name(0.0, ts=True)]]
        ax.axhline(np.nanmean(ts), color="tab:green", ls="--", label="ε=0 + temperature scaling")
        ax.set(xlabel="ε", title=label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Digits test split, mean ± std over {n_seeds} seed(s)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def projection_name(classes) -> str:
    return "penultimate_" + "-".join(map(str, classes)) + ".png"


# Müller et al. show three classes far apart and a triple with two similar ones;
# with this network 1 and 8 are the digits most often confused (then 3 / 5 and 8 / 9).
DEFAULT_TRIPLES = [(0, 1, 2), (1, 8, 9)]


def experiment_parser(doc: str, *, fast: str, out: str, files: str, seeds: int) -> argparse.ArgumentParser:
    """The options the digits examples share: --fast, --out, --seeds, --seed0, --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help=f"{fast} (a smoke test)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"folder for the pictures, {files}")
    p.add_argument("--seeds", type=int, default=seeds, help="number of seeds (initial weights and data order)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible and fast for this size)")
    return p


def main(argv=None):
    p = experiment_parser(__doc__, fast="one seed, few epochs, ε ∈ {0, 0.1}", out="label_smoothing_effects_out",
                          files="results.md and results.json", seeds=10)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                   help="label-smoothing values; must include 0 and 0.1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--triples", type=str, nargs="+", default=[",".join(map(str, t)) for t in DEFAULT_TRIPLES],
                   help="digit triples for the penultimate-layer projections, e.g. 0,1,2 1,8,9")
    args = p.parse_args(argv)
    if args.fast:
        args.seeds, args.epochs, args.eps = 1, 8, [0.0, 0.1]
    args.eps = sorted(set(args.eps))
    if 0.0 not in args.eps or 0.1 not in args.eps:
        p.error("--eps must include 0 and 0.1")
    if any(not 0.0 <= e <= 1.0 for e in args.eps):
        p.error("--eps values must lie in [0, 1]")
    try:
        triples = [tuple(int(k) for k in t.split(",")) for t in args.triples]
    except ValueError:
        p.error("--triples: give digits separated by commas, e.g. 0,1,2")
    if any(len(t) != 3 or len(set(t)) != 3 or not all(0 <= k < NUM_CLASSES for k in t) for t in triples):
        p.error("--triples: each triple needs three different digits in 0..9")

    clock = Clock()
    t0 = clock.now()
    data, cols, per_seed, pooled, kept = run(args)
    table = tables(cols, per_seed, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    yte = data["test"][1]
    plot_reliability(args.out / "reliability.png", pooled, yte, cols, args.seeds)
    plot_confidence(args.out / "confidence.png", pooled, yte, cols, args.seeds)
    for t in triples:
        plot_projection(args.out / projection_name(t), kept, data, t)
    plot_sweep(args.out / "sweep.png", args.eps, per_seed, args.seeds)
    elapsed = clock.since(t0)

    n = {k: len(v[1]) for k, v in data.items()}
    header = (f"digits (scikit-learn), train/val/test = {n['train']}/{n['val']}/{n['test']}; "
              f"MLP 64-128-64-10, Adam lr={args.lr:g}, batch {args.batch_size}, {args.epochs} epochs; "
              f"seeds {args.seed0}..{args.seed0 + args.seeds - 1}; TS = temperature scaling fitted on val; "
              f"{elapsed:.0f} s")
    print(header)
    print()
    print(table)
    (args.out / "results.md").write_text(header + "\n\n" + table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "per_seed": {c: [{k: (None if math.isnan(v) else v) for k, v in m.items()} for m in ms]
                      for c, ms in per_seed.items()},
         "seconds": elapsed}, indent=1, allow_nan=False, ensure_ascii=False))
    figures = ["reliability.png", "confidence.png"] + [projection_name(t) for t in triples] + ["sweep.png"]
    print(f"\npictures: {', '.join(str(args.out / f) for f in figures)}", file=sys.stderr)


if __name__ == "__main__":
    main()
