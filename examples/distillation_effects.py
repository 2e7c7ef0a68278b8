"""Is a label-smoothed teacher a worse teacher? Müller et al.'s (2019) distillation claim, measured with lsce.

Two regimes on scikit-learn's bundled handwritten digits (the data, split, MLP,
metrics and helpers of ``label_smoothing_effects.py``, imported from it):

- ``clean``: the teacher is label_smoothing_effects.py's MLP 64-128-64-10 with its
  recipe (Adam lr 1e-3, batch 32, 100 epochs) on the clean labels; it comes out
  nearly calibrated.
- ``noisy``: a fixed 20 % of the training labels replaced by a uniformly drawn
  *other* class, and a wider teacher (64-512-512-10) trained longer (200 epochs),
  so that it memorises the wrong labels and is truly over-confident on the
  (clean) test split; its ECE and the temperature that temperature scaling
  fits say how much.

In each regime, for each seed: two teachers from the same initial weights and
mini-batch order, trained with ``lsce.CrossEntropyLoss(label_smoothing=ε)`` at
ε = 0 and ε = 0.1; then students (a smaller MLP 64-32-10, all from one initial
weight set per seed) trained on the same training labels, either on the hard
labels alone (``lsce.cross_entropy``) or distilled from each teacher at each
temperature T with ``lsce.distillation_loss(student, labels,
teacher_logits=…, temperature=T, alpha=α)`` (forward KL, β = 0; α = 0.5 by
default: half distillation, half cross-entropy on the hard labels).

Reported on the test split, mean ± std over seeds, and paired (same seed, same
initial weights, same data order) differences with their std:

- teachers: accuracy, NLL, ECE (15 bins, L1, torchmetrics), the same after
  temperature scaling fitted on the validation split, and the information
  measure below;
- students: accuracy, NLL, ECE; each against the hard-label student, and the
  ε = 0.1 teacher's student against the ε = 0 teacher's at the same T.

**Information erasure (Müller et al. 2019, section 4).** For a pair of classes
(a, b), X is the index of one of the N training examples of class a or b
(uniform), and Y the teacher's logit difference z_a − z_b on a randomly
augmented copy of it. As in the paper, p(y | x) is taken Gaussian,
N(μ_x, σ²), with μ_x the mean of x's L copies and σ² the within-example
variance pooled over all N·L values, and

    I(X; Y) = E[log p(y | x) − log p(y)],   p(y) = (1/N) Σ_x' p(y | x'),

is estimated by its average over the N·L (x, y) pairs:

    Î = log N + (1/(N·L)) Σ_x Σ_l log softmax_x'(−(y_xl − μ_x')² / 2σ²)[x],

which lies at or below log N (the paper's printed formula leaves out the 1/N
and the log N; this is the same estimate with both). Î does not change when all
logits are divided by one number, so the smaller logits of a smoothed teacher
do not lower it by themselves. Reported: Î averaged over all 45 class pairs
(pairs chosen by the examples' true classes, also in the noisy regime), with
log N, its ceiling; and Î over the teachers' training. A teacher whose logits
keep how each example differs from the others of its class has a high Î; one
that maps every example of a class to the same logits has Î near 0.

The augmentation: the paper's networks were trained with the augmentation the
estimate uses; these teachers are trained without one. By default
(``--augment noise``) each example gets L = 16 copies with Gaussian pixel noise
of std 0.05 added (clipped to [0, 1], drawn once); ``--augment shift`` uses the
9 shifts of the image by at most one pixel instead, which moves the logits of
these teachers as much within an example as between examples (Î near 0.3 nats
for every teacher, see examples/README.md).

Pictures (PNG): students' accuracy, NLL and ECE against T; Î over the
teachers' training; reliability diagrams of the teachers.

    python examples/distillation_effects.py --out examples/figures      # full run (≤ 15 min, 1 thread)
    python examples/distillation_effects.py --fast --out /tmp/kd        # 1 seed, few epochs

Needs scikit-learn, torchmetrics and matplotlib: ``pip install "lsce[examples]"``.
Everything runs offline.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lsce
# The sibling example: its data, network, training loop, metrics and helpers (it also
# checks that scikit-learn, torchmetrics and matplotlib are installed, and picks Agg).
from label_smoothing_effects import (MLP, N_BINS, NUM_CLASSES, experiment_parser, fit, fit_temperature, fmt,
                                     forward_all, load_splits, metrics, reliability)
import matplotlib.pyplot as plt  # noqa: E402  (after the sibling chose the Agg backend)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared benchmarks/measure.py
from measure import Clock  # noqa: E402

EPS = (0.0, 0.1)
# Rows of the teachers' table (key, label) in order; the test parses the tables by these names.
TEACHER_ROWS = [
    ("train_fit", "accuracy on its training labels"),
    ("accuracy", "test accuracy"),
    ("nll", "test NLL"),
    ("conf_wrong", "mean confidence, wrong"),
    ("ece", "ECE (15 bins, L1)"),
    ("temperature", "temperature T"),
    ("mi", "MI Î (nats), mean of 45 pairs"),
    ("log_n", "log N, mean of 45 pairs"),
]
STUDENT_KEYS = [("accuracy", "test accuracy"), ("nll", "test NLL"), ("ece", "ECE")]
SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# ----------------------------------------------------------------------------- data

def noisy_labels(y, rate: float, seed: int = 0):
    """`y` with round(rate·N) entries, drawn once by `seed`, replaced by a uniformly
    drawn other class."""
    g = torch.Generator().manual_seed(seed)
    n = round(rate * len(y))
    idx = torch.randperm(len(y), generator=g)[:n]
    out = y.clone()
    out[idx] = (y[idx] + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES
    return out


def augmented_copies(X, how: str, copies: int, pixel_noise: float, seed: int = 0):
    """(N, L, 64): L augmented copies of each image. ``noise``: L copies with independent
    Gaussian pixel noise of std `pixel_noise` added, clipped to [0, 1] (drawn once by
    `seed`); ``shift``: the 9 shifts of the 8×8 image by (dy, dx) ∈ {−1, 0, 1}², zeros
    shifted in (`copies` and `pixel_noise` unused)."""
    if how == "shift":
        padded = F.pad(X.view(-1, 8, 8), (1, 1, 1, 1))
        return torch.stack([padded[:, 1 + dy:9 + dy, 1 + dx:9 + dx].reshape(-1, 64) for dy, dx in SHIFTS], dim=1)
    g = torch.Generator().manual_seed(seed)
    return (X[:, None, :] + pixel_noise * torch.randn(X.shape[0], copies, X.shape[1], generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------- information erasure

def mutual_information(y) -> float:
    """Müller et al.'s Gaussian estimate of I(X; Y) in nats (module docstring) from
    y (N, L): example x's logit difference on its L augmented copies."""
    y = y.double()
    n = y.shape[0]
    mu = y.mean(1)
    var = (y - mu[:, None]).pow(2).mean()
    logp = -(y.reshape(-1, 1) - mu[None, :]).pow(2) / (2 * var)       # (N·L, N): log p(y | x') + const
    own = torch.arange(n).repeat_interleave(y.shape[1])
    log_post = logp.gather(1, own[:, None]).squeeze(1) - torch.logsumexp(logp, 1)
    return math.log(n) + float(log_post.mean())


@torch.no_grad()
def information(model, copies, classes, temperature: float = 1.0):
    """(mean Î, mean log N) over all class pairs, from the logits of `copies` (N, L, 64)."""
    z = model(copies.reshape(-1, 64)).view(copies.shape[0], copies.shape[1], NUM_CLASSES) / temperature
    mis, logs = [], []
    for a, b in itertools.combinations(range(NUM_CLASSES), 2):
        sel = (classes == a) | (classes == b)
        mis.append(mutual_information(z[sel][:, :, a] - z[sel][:, :, b]))
        logs.append(math.log(int(sel.sum())))
    return float(np.mean(mis)), float(np.mean(logs))


# ----------------------------------------------------------------------------- the experiment

def regimes(args):
    return {
        "clean": dict(noise=0.0, widths=(128, 64), epochs=args.teacher_epochs),
        "noisy": dict(noise=args.noise, widths=tuple(args.noisy_widths), epochs=args.noisy_epochs),
    }


def describe(name, r) -> str:
    net = "-".join(map(str, (64,) + r["widths"] + (NUM_CLASSES,)))
    return f"{name}: {r['noise']:.0%} of training labels replaced; teacher MLP {net}, {r['epochs']} epochs"


def student_col(eps=None, T=None) -> str:
    return "hard labels only" if eps is None else f"ε={eps:g} teacher, T={T:g}"


def teacher_col(eps: float, ts: bool = False) -> str:
    return f"ε={eps:g}" + (" + TS" if ts else "")


def run_regime(r, data, args, seed, copies, curves):
    """One seed of one regime: {teacher column: metrics}, {student column: metrics}."""
    X, y_clean = data["train"]
    y = noisy_labels(y_clean, r["noise"], args.noise_seed) if r["noise"] > 0 else y_clean
    Xte, yte = data["test"]
    torch.manual_seed(seed)
    teacher_init = copy.deepcopy(MLP(r["widths"]).state_dict())
    student_init = copy.deepcopy(MLP(tuple(args.student_widths)).state_dict())

    teachers, tm = {}, {}
    for eps in EPS:
        model = MLP(r["widths"])
        model.load_state_dict(teacher_init)
        crit = lsce.CrossEntropyLoss(label_smoothing=eps)
        curve = []

        def record(m, epoch, curve=curve):
            if epoch % args.mi_every == 0 or epoch == r["epochs"]:
                curve.append((epoch, information(m, copies, y_clean)[0]))

        fit(model, X, lambda out, idx, crit=crit: crit(out, y[idx]), seed=seed, epochs=r["epochs"],
            batch_size=args.batch_size, lr=args.lr, after_epoch=record)
        curves[teacher_col(eps)].append(curve)
        teachers[eps] = model
        feats, logits = forward_all(model, Xte)
        T = fit_temperature(forward_all(model, data["val"][0])[1], data["val"][1])
        train_fit = float((forward_all(model, X)[1].argmax(1) == y).double().mean())
        for ts, scale in ((False, 1.0), (True, T)):
            if ts and eps != 0.0:
                continue
            m = metrics(logits / scale, yte, feats)
            m["mi"], m["log_n"] = information(model, copies, y_clean, scale)
            m["temperature"] = T if ts else math.nan
            m["train_fit"] = train_fit
            m["logits"] = logits / scale
            tm[teacher_col(eps, ts)] = m

    sm = {}
    jobs = [(None, None)] + [(eps, T) for eps in EPS for T in args.temperatures]
    for eps, T in jobs:
        student = MLP(tuple(args.student_widths))
        student.load_state_dict(student_init)
        if eps is None:
            loss = lambda out, idx: lsce.cross_entropy(out, y[idx])  # noqa: E731
        else:
            with torch.no_grad():
                t_logits = teachers[eps](X)
            loss = (lambda out, idx, t_logits=t_logits, T=T: lsce.distillation_loss(
                out, y[idx], teacher_logits=t_logits[idx], temperature=T, alpha=args.alpha))
        fit(student, X, loss, seed=seed, epochs=args.student_epochs, batch_size=args.student_batch_size,
            lr=args.student_lr)
        feats, logits = forward_all(student, Xte)
        sm[student_col(eps, T)] = metrics(logits, yte, feats)
    return tm, sm


def run(args):
    torch.set_num_threads(args.threads)
    data = load_splits()
    copies = augmented_copies(data["train"][0], args.augment, args.copies, args.pixel_noise)
    rs = regimes(args)
    out = {name: {"teachers": {}, "students": {}, "curves": {teacher_col(e): [] for e in EPS}} for name in rs}
    clock = Clock()
    t0 = clock.now()
    for s in range(args.seeds):
        seed = args.seed0 + s
        for name, r in rs.items():
            tm, sm = run_regime(r, data, args, seed, copies, out[name]["curves"])
            for c, m in tm.items():
                out[name]["teachers"].setdefault(c, []).append(m)
            for c, m in sm.items():
                out[name]["students"].setdefault(c, []).append(m)
            print(f"seed {seed}, {name}: done ({clock.since(t0):.0f} s so far)", file=sys.stderr, flush=True)
    return data, rs, out


# ----------------------------------------------------------------------------- tables

def paired(a, b, key):
    """Per-seed a[key] − b[key]."""
    return [x[key] - z[key] for x, z in zip(a, b)]


def count(values, sign) -> str:
    return f"{sum(1 for v in values if v * sign > 0)}/{len(values)}"


def teacher_table(name, res, n_seeds) -> str:
    t = res["teachers"]
    cols = [teacher_col(0.0), teacher_col(0.0, ts=True), teacher_col(0.1)]
    head = (f"| {name} teachers, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''} | "
            + " | ".join(cols) + " | ε=0.1 − ε=0, same seed | TS − ε=0, same seed |")
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for key, label in TEACHER_ROWS:
        cells = [fmt([m[key] for m in t[c]]) for c in cols]
        if key in ("temperature", "log_n"):
            cells += ["—", "—"]
        else:
            cells += [fmt(paired(t[cols[2]], t[cols[0]], key)), fmt(paired(t[cols[1]], t[cols[0]], key))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def student_table(name, res, args) -> str:
    st = res["students"]
    base = st[student_col()]
    head = (f"| {name} students | " + " | ".join(l for _, l in STUDENT_KEYS)
            + " | " + " | ".join(f"Δ {l} to hard labels" for _, l in STUDENT_KEYS) + " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(STUDENT_KEYS))]
    for c, ms in st.items():
        cells = [fmt([m[k] for m in ms]) for k, _ in STUDENT_KEYS]
        cells += ["—"] * len(STUDENT_KEYS) if ms is base else [fmt(paired(ms, base, k)) for k, _ in STUDENT_KEYS]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_table(name, res, args) -> str:
    """The claim itself: the ε = 0.1 teacher's student minus the ε = 0 teacher's, same seed and T."""
    st = res["students"]
    head = (f"| {name}: ε=0.1 teacher's student − ε=0 teacher's, same seed | "
            + " | ".join(f"Δ {l}" for _, l in STUDENT_KEYS) + " | seeds where ε=0.1 is less accurate |")
    lines = [head, "|" + "---|" * (2 + len(STUDENT_KEYS))]
    for T in args.temperatures:
        a, b = st[student_col(0.1, T)], st[student_col(0.0, T)]
        d_acc = paired(a, b, "accuracy")
        lines.append(f"| T={T:g} | " + " | ".join(fmt(paired(a, b, k)) for k, _ in STUDENT_KEYS)
                     + f" | {count(d_acc, -1)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures

def mean_std(values):
    """Mean and sample std over the first axis (seeds)."""
    v = np.asarray(values, dtype=np.float64)
    return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:]))


def plot_students(path, rs, out, args):
    fig, axes = plt.subplots(len(rs), len(STUDENT_KEYS), figsize=(4.2 * len(STUDENT_KEYS), 3.6 * len(rs)),
                             constrained_layout=True, squeeze=False)
    for row, name in zip(axes, rs):
        st = out[name]["students"]
        for ax, (key, label) in zip(row, STUDENT_KEYS):
            for eps, color in zip(EPS, ["tab:blue", "tab:orange"]):
                m, s = mean_std(np.array([[r[key] for r in st[student_col(eps, T)]] for T in args.temperatures]).T)
                ax.errorbar(args.temperatures, m, yerr=s, marker="o", capsize=3, color=color,
                            label=f"from the ε={eps:g} teacher")
            m, s = mean_std([[r[key]] for r in st[student_col()]])
            ax.axhline(m[0], color="k", ls="--", label="hard labels only (± std shaded)")
            ax.axhspan(m[0] - s[0], m[0] + s[0], color="k", alpha=0.1)
            ax.set(xscale="log", xticks=args.temperatures, xticklabels=[f"{t:g}" for t in args.temperatures],
                   xlabel="distillation temperature T", title=f"{name}: student {label}")
        row[0].legend(fontsize=7)
    fig.suptitle(f"Students MLP 64-{'-'.join(map(str, args.student_widths))}-10 on digits, α={args.alpha:g}; "
                 f"test split, mean ± std over {args.seeds} seed(s)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_information(path, rs, out, args):
    fig, axes = plt.subplots(1, len(rs), figsize=(5.2 * len(rs), 3.8), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], rs):
        for eps, color in zip(EPS, ["tab:blue", "tab:orange"]):
            curves = out[name]["curves"][teacher_col(eps)]
            epochs = [e for e, _ in curves[0]]
            m, s = mean_std([[v for _, v in c] for c in curves])
            ax.plot(epochs, m, color=color, marker=".", label=f"teacher ε={eps:g}")
            ax.fill_between(epochs, m - s, m + s, color=color, alpha=0.2)
        log_n = np.mean([m["log_n"] for m in out[name]["teachers"][teacher_col(0.0)]])
        ax.axhline(log_n, color="grey", ls=":", label=f"log N (ceiling), {log_n:.2f}")
        ax.set(xlabel="teacher's training epoch", ylabel="Î (nats), mean of 45 class pairs", ylim=(0, None),
               title=f"{name}")
        ax.legend(fontsize=8)
    how = f"pixel noise std {args.pixel_noise:g}" if args.augment == "noise" else "shifts by ≤ 1 pixel"
    fig.suptitle("Mutual information between a training example's index and its teacher's logit difference "
                 f"over {args.copies} augmented copies ({how})\n(Müller et al. 2019, section 4), "
                 f"mean ± std over {args.seeds} seed(s)",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_teacher_reliability(path, rs, out, target, args):
    cols = [teacher_col(0.0), teacher_col(0.0, ts=True), teacher_col(0.1)]
    fig, axes = plt.subplots(len(rs), len(cols), figsize=(4.2 * len(cols), 4.4 * len(rs)),
                             constrained_layout=True, squeeze=False)
    for row, name in zip(axes, rs):
        for ax, c in zip(row, cols):
            logits = torch.cat([m["logits"] for m in out[name]["teachers"][c]])
            reliability(ax, logits, target.repeat(args.seeds), f"{name} teacher {c}")
        row[0].set_ylabel("accuracy")
    fig.suptitle(f"Teachers' reliability diagrams, digits test split, {N_BINS} bins, pooled over "
                 f"{args.seeds} seed(s); n = examples per bin", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = ["distillation_students.png", "distillation_information.png", "distillation_reliability.png"]


def main(argv=None):
    p = experiment_parser(__doc__, fast="one seed, few epochs", out="distillation_effects_out",
                          files="distillation_results.md and distillation_results.json", seeds=5)
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the distillation term (1 − alpha on the hard labels' cross-entropy)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels replaced (noisy regime)")
    p.add_argument("--noise-seed", type=int, default=0, help="draws which labels are replaced, and by what")
    p.add_argument("--noisy-widths", type=int, nargs="+", default=[256, 256], help="noisy regime's teacher")
    p.add_argument("--teacher-epochs", type=int, default=100, help="clean regime's teachers")
    p.add_argument("--noisy-epochs", type=int, default=150, help="noisy regime's teachers")
    p.add_argument("--batch-size", type=int, default=32, help="teachers")
    p.add_argument("--lr", type=float, default=1e-3, help="teachers")
    p.add_argument("--student-widths", type=int, nargs="+", default=[32])
    p.add_argument("--student-epochs", type=int, default=60)
    p.add_argument("--student-batch-size", type=int, default=128)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--augment", choices=["noise", "shift"], default="noise",
                   help="the augmentation whose spread Müller et al.'s information estimate uses")
    p.add_argument("--copies", type=int, default=16, help="augmented copies per example (--augment noise)")
    p.add_argument("--pixel-noise", type=float, default=0.05, help="pixel noise std (--augment noise)")
    p.add_argument("--mi-every", type=int, default=10, help="epochs between two Î of the teachers' training")
    args = p.parse_args(argv)
    if args.fast:
        args.seeds, args.teacher_epochs, args.noisy_epochs, args.student_epochs, args.mi_every = 1, 8, 8, 8, 2
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must lie in [0, 1]")
    if any(not t > 0 for t in args.temperatures):
        p.error("--temperatures must be > 0")
    if not 0.0 < args.noise < 1.0:
        p.error("--noise must lie in (0, 1)")
    if args.seeds < 1 or args.mi_every < 1 or args.copies < 2:
        p.error("--seeds and --mi-every must be ≥ 1, --copies ≥ 2")
    if not args.pixel_noise > 0:
        p.error("--pixel-noise must be > 0")
    if args.augment == "shift":
        args.copies = len(SHIFTS)
    args.temperatures = sorted(set(args.temperatures))

    clock = Clock()
    t0 = clock.now()
    data, rs, out = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_students(args.out / FIGURES[0], rs, out, args)
    plot_information(args.out / FIGURES[1], rs, out, args)
    plot_teacher_reliability(args.out / FIGURES[2], rs, out, data["test"][1], args)
    elapsed = clock.since(t0)

    n = {k: len(v[1]) for k, v in data.items()}
    student_net = "-".join(map(str, [64] + args.student_widths + [NUM_CLASSES]))
    header = (f"digits (scikit-learn), train/val/test = {n['train']}/{n['val']}/{n['test']}; "
              + "; ".join(describe(k, r) for k, r in rs.items())
              + f"; teachers Adam lr={args.lr:g}, batch {args.batch_size}; students MLP {student_net}, "
              f"Adam lr={args.student_lr:g}, batch {args.student_batch_size}, {args.student_epochs} epochs, "
              f"lsce.distillation_loss alpha={args.alpha:g} (forward KL); "
              f"seeds {args.seed0}..{args.seed0 + args.seeds - 1}; "
              f"TS = temperature scaling fitted on val; Î over {args.copies} copies per example "
              + (f"with pixel noise std {args.pixel_noise:g}" if args.augment == "noise" else "shifted by ≤ 1 pixel")
              + f"; {elapsed:.0f} s")
    blocks = []
    for name in rs:
        blocks += [teacher_table(name, out[name], args.seeds), student_table(name, out[name], args),
                   claim_table(name, out[name], args)]
    text = header + "\n\n" + "\n\n".join(blocks)
    print(text)
    (args.out / "distillation_results.md").write_text(text + "\n")
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    (args.out / "distillation_results.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "results": {name: {"teachers": {c: [{k: clean(v) for k, v in m.items() if k != "logits"} for m in ms]
                                         for c, ms in res["teachers"].items()},
                            "students": {c: [{k: clean(v) for k, v in m.items()} for m in ms]
                                         for c, ms in res["students"].items()},
                            "information_curves": res["curves"]}
                     for name, res in out.items()},
         "seconds": elapsed}, indent=1, allow_nan=False, ensure_ascii=False))
    print(f"\npictures: {', '.join(str(args.out / f) for f in FIGURES)}", file=sys.stderr)


if __name__ == "__main__":
    main()
