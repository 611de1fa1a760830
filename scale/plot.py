"""``entdyn plot RUN_DIR``: figures from a training run directory (matplotlib only; never torch).

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per step: ``"step"`` plus flat float metrics, see
:mod:`scale.metrics_log`, "Logged metrics") and ``RUN_DIR/samples/step_XXXXXX.jsonl`` (sampled
completions with per-token ``tokens``, ``entropy``, ``s_star``, ``deviation``, ``quadrant``, and the
sample's ``advantage`` and ``reward``) and writes into ``RUN_DIR/plots/`` (or ``--out``):

* ``reward.png`` — training reward and accuracy (and held-out eval metrics when logged) over steps;
* ``entropy.png`` — mean token entropy over all, positive and negative samples;
* ``delta_h.png`` — the measured entropy change of each diagnosed step beside the tabular (E6-sum)
  prediction and the network-level first-order (JVP) prediction, over steps and as a scatter;
* ``position.png`` — entropy by relative-position bucket over training (paper 2 §3.4's U-shape);
* ``tokens.html`` and ``tokens.png`` — sampled completions with every token coloured by its entropy and,
  below, by its quadrant ``sign(A) x sign(S* - E_p[S])`` (docs/equations.md §4, the quadrant table).

A metric a run did not log is skipped, never invented: the figure leaves that line out and says so in
its legend or title.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

from .metrics_log import read_metrics

__all__ = ["load_metrics", "load_samples", "plot_run", "render_tokens_html", "delta_h_table", "main", "KEYS"]

#: metric names read from metrics.jsonl (the first present name of each tuple is used)
KEYS: dict[str, tuple[str, ...]] = {
    "reward": ("reward", "reward/mean"),
    "accuracy": ("accuracy", "reward/accuracy"),
    "entropy": ("entropy", "entropy/all"),
    "entropy_pos": ("entropy/pos", "entropy_pos"),
    "entropy_neg": ("entropy/neg", "entropy_neg"),
    "dH_measured": ("theory/dH_measured", "dH_measured"),
    "dH_tabular": ("theory/dH_tabular", "dH_tabular"),
    "dH_jvp": ("theory/dH_jvp", "dH_jvp"),
}
POS_BUCKET_PREFIX = ("entropy/pos_bucket_", "entropy/position_")
#: a metric is undefined (a mean over no token, logged as 0) in the steps where its guard is 0
EMPTY_WHEN = {"entropy/pos": "adv/pos_frac", "entropy/neg": "adv/neg_frac"}
QUADRANT_NAMES = ("pos_high", "pos_low", "neg_high", "neg_low")
QUADRANT_COLORS = ("#d62728", "#ff7f0e", "#1f77b4", "#2ca02c")  # code 0..3; -1 (undefined) grey


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (:func:`scale.metrics_log.read_metrics`: a malformed line raises
    ``ValueError`` with its line number, a torn last line is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory of `entdyn train`?")
    return read_metrics(run_dir)


def load_samples(run_dir: str | Path, step: int | None = None) -> tuple[int | None, list[dict]]:
    """Samples of ``step`` (default: the last step that wrote samples) as ``(step, records)``."""
    files = sorted((Path(run_dir) / "samples").glob("step_*.jsonl"))
    if step is not None:
        files = [f for f in files if int(f.stem.split("_")[1]) == step]
    if not files:
        return None, []
    f = files[-1]
    recs = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return int(f.stem.split("_")[1]), recs


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float], str | None]:
    """(steps, values, key used) of metric ``name`` (a :data:`KEYS` entry or a raw key)."""
    for key in KEYS.get(name, (name,)):
        guard = EMPTY_WHEN.get(key)
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)
               and math.isfinite(r[key]) and not (guard and r.get(guard) == 0)]
        if pts:
            return [p[0] for p in pts], [float(p[1]) for p in pts], key
    return [], [], None


def _plt():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _entropy_color(h: float, hmax: float) -> tuple[float, float, float]:
    """White (H = 0) to purple (H = hmax): a scale distinct from the quadrant colours."""
    x = 0.0 if hmax <= 0 else min(max(h / hmax, 0.0), 1.0)
    return (1.0 - 0.45 * x, 1.0 - 0.7 * x, 1.0 - 0.2 * x)


def render_tokens_html(samples: list[dict], *, step: int | None = None, max_samples: int = 8) -> str:
    """A self-contained HTML page: each sample's tokens coloured by entropy, then by quadrant."""
    hmax = max((max(s.get("entropy") or [0.0]) for s in samples[:max_samples]), default=1.0) or 1.0
    out = ["<!doctype html><meta charset='utf-8'><title>entdyn tokens</title>",
           "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
           ".t{font-family:monospace;white-space:pre-wrap;border-radius:3px;padding:0 1px}"
           ".s{margin:1.2em 0;padding:.6em;border:1px solid #ddd;border-radius:6px}"
           "small{color:#555}</style>",
           f"<h2>Sampled completions{'' if step is None else f' at step {step}'}</h2>",
           "<p>Top line of each sample: tokens coloured by entropy H (white = 0, purple = "
           f"{hmax:.2f} nats, the maximum shown). Bottom line: by quadrant sign(A) × sign(S* − E_p[S]): "
           + " ".join(f"<span class='t' style='background:{c};color:white'>{n}</span>"
                      for n, c in zip(QUADRANT_NAMES, QUADRANT_COLORS, strict=True))
           + " <span class='t' style='background:#999;color:white'>undefined</span>. "
           "Hover a token for its numbers.</p>"]
    for s in samples[:max_samples]:
        toks = s.get("tokens") or []
        ent = s.get("entropy") or [float("nan")] * len(toks)
        sst = s.get("s_star") or [float("nan")] * len(toks)
        dev = s.get("deviation") or [float("nan")] * len(toks)
        quad = s.get("quadrant") or [-1] * len(toks)
        out.append("<div class='s'>")
        out.append(f"<small>reward {s.get('reward', float('nan')):.3g}, advantage "
                   f"{s.get('advantage', float('nan')):+.3g} — prompt: "
                   f"{html.escape(str(s.get('prompt', ''))[-200:])}</small><br>")
        line1, line2 = [], []
        for i, tok in enumerate(toks):
            tip = html.escape(f"H={ent[i]:.3f} S*={sst[i]:.4f} S*-E_p[S]={dev[i]:+.4f} "
                              f"quadrant={QUADRANT_NAMES[quad[i]] if 0 <= quad[i] < 4 else 'undefined'}")
            r, g, b = _entropy_color(ent[i] if math.isfinite(ent[i]) else 0.0, hmax)
            text = html.escape(tok)
            line1.append(f"<span class='t' title='{tip}' style='background:rgb({r * 255:.0f},"
                         f"{g * 255:.0f},{b * 255:.0f})'>{text}</span>")
            qc = QUADRANT_COLORS[quad[i]] if 0 <= quad[i] < 4 else "#999"
            line2.append(f"<span class='t' title='{tip}' style='background:{qc};color:white'>{text}</span>")
        out.append("<div>" + "".join(line1) + "</div><div style='margin-top:.3em'>" + "".join(line2)
                   + "</div></div>")
    return "\n".join(out) + "\n"


def _printable(tok: str) -> str:
    """A token as the PNG shows it: newline ⏎, tab ⇥, other control characters ·."""
    tok = tok.replace("\n", "⏎").replace("\t", "⇥")
    return "".join(c if c.isprintable() else "·" for c in tok)


def _tokens_png(samples: list[dict], path: Path, *, step: int | None, max_samples: int = 4,
                max_tokens: int = 48) -> None:
    """Tokens as coloured boxes (entropy row, quadrant row per sample) — the notebook-friendly view."""
    plt = _plt()
    samples = samples[:max_samples]
    hmax = max((max(s.get("entropy") or [0.0]) for s in samples), default=1.0) or 1.0
    per_row = 16
    rows = sum(2 * math.ceil(min(len(s.get("tokens") or []), max_tokens) / per_row) + 1 for s in samples)
    fig, ax = plt.subplots(figsize=(14, 0.42 * max(rows, 2) + 0.8))
    ax.set_xlim(0, per_row)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    y = 0
    for s in samples:
        toks = (s.get("tokens") or [])[:max_tokens]
        ent = (s.get("entropy") or [0.0] * len(toks))[:max_tokens]
        quad = (s.get("quadrant") or [-1] * len(toks))[:max_tokens]
        head = f"reward {s.get('reward', float('nan')):.3g}, A {s.get('advantage', float('nan')):+.3g}"
        ax.text(0, y + 0.7, head, fontsize=8, color="0.3")
        y += 1
        for start in range(0, len(toks), per_row):
            for j, i in enumerate(range(start, min(start + per_row, len(toks)))):
                label = _printable(toks[i])[:8]
                h = ent[i] if math.isfinite(ent[i]) else 0.0
                ax.add_patch(plt.Rectangle((j, y), 0.96, 0.9, color=_entropy_color(h, hmax)))
                ax.text(j + 0.48, y + 0.6, label, ha="center", fontsize=7, family="monospace")
                qc = QUADRANT_COLORS[quad[i]] if 0 <= quad[i] < 4 else "#999999"
                ax.add_patch(plt.Rectangle((j, y + 1), 0.96, 0.9, color=qc))
                ax.text(j + 0.48, y + 1.6, label, ha="center", fontsize=7, family="monospace", color="white")
            y += 2
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in QUADRANT_COLORS]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=_entropy_color(hmax, hmax)))
    ax.legend(handles, list(QUADRANT_NAMES) + [f"H = {hmax:.2f} (upper rows; white = 0)"], ncol=5,
              loc="upper center", bbox_to_anchor=(0.5, 1.0 + 0.6 / max(rows, 2)), fontsize=8, frameon=False)
    at = "" if step is None else f", step {step}"
    ax.set_title(f"tokens by entropy (upper row) and by quadrant (lower row){at}", fontsize=10, pad=22)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write every figure for ``run_dir``; returns the written paths."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_metrics(run_dir)
    plt = _plt()
    written: list[Path] = []

    def save(fig, name):
        p = out / name
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # reward / accuracy / eval
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for name, style in (("reward", "-"), ("accuracy", "--")):
        x, y, key = _series(rows, name)
        if key:
            ax.plot(x, y, style, label=f"train {key}")
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    for key in eval_keys[:4]:
        x, y, _ = _series(rows, key)
        ax.plot(x, y, "o-", ms=3, label=key)
    ax.set(xlabel="step", ylabel="reward / accuracy", title="reward")
    ax.legend(fontsize=8)
    save(fig, "reward.png")

    # entropy by polarity
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for name, c in (("entropy", "k"), ("entropy_pos", "C2"), ("entropy_neg", "C3")):
        x, y, key = _series(rows, name)
        if key:
            ax.plot(x, y, color=c, label=key)
    ax.set(xlabel="step", ylabel="mean token entropy (nats)",
           title="entropy: all, positive and negative samples")
    ax.legend(fontsize=8)
    save(fig, "entropy.png")

    # predicted vs measured dH
    xm, ym, km = _series(rows, "dH_measured")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), layout="constrained")
    if km:
        axes[0].plot(xm, ym, "k.-", label=f"measured ({km})")
        for name, c in (("dH_tabular", "C0"), ("dH_jvp", "C1")):
            x, y, key = _series(rows, name)
            if key:
                axes[0].plot(x, y, ".-", color=c, label=f"predicted: {key}")
                by_step = dict(zip(x, y, strict=True))
                pairs = [(by_step[s], m) for s, m in zip(xm, ym, strict=True) if s in by_step]
                if pairs:
                    axes[1].scatter([p[0] for p in pairs], [p[1] for p in pairs], s=12, color=c, label=key)
        lim = max([abs(v) for v in ym] + [1e-12]) * 1.1
        axes[1].plot([-lim, lim], [-lim, lim], "--", color="0.6", lw=1)
        axes[0].set_title("entropy change per diagnosed step")
        axes[1].set_title("predicted vs measured")
    else:
        axes[0].set_title("no theory diagnostics logged (train with diagnostics on)")
    axes[0].set(xlabel="step", ylabel="ΔH (nats)")
    axes[1].set(xlabel="predicted ΔH", ylabel="measured ΔH")
    for a in axes:
        a.legend(fontsize=8) if a.get_legend_handles_labels()[0] else None
    save(fig, "delta_h.png")

    # entropy by relative position bucket
    buckets = sorted({k for r in rows for k in r if k.startswith(POS_BUCKET_PREFIX)},
                     key=lambda k: int(k.rsplit("_", 1)[1]) if k.rsplit("_", 1)[1].isdigit() else 0)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    if buckets:
        cmap = plt.get_cmap("viridis")
        for i, key in enumerate(buckets):
            x, y, _ = _series(rows, key)
            ax.plot(x, y, color=cmap(i / max(len(buckets) - 1, 1)), label=f"bucket {i + 1}/{len(buckets)}")
        ax.legend(fontsize=8, title="relative position")
        ax.set_title("entropy by relative position in the response")
    else:
        ax.set_title("no per-position entropy logged")
    ax.set(xlabel="step", ylabel="mean token entropy (nats)")
    save(fig, "position.png")

    # token-level view
    step, samples = load_samples(run_dir)
    if samples:
        p = out / "tokens.html"
        p.write_text(render_tokens_html(samples, step=step), encoding="utf-8")
        written.append(p)
        _tokens_png(samples, out / "tokens.png", step=step)
        written.append(out / "tokens.png")
    return written


def delta_h_table(rows: list[dict]) -> str:
    """Markdown table of the diagnosed steps: measured ΔH beside the tabular and JVP predictions."""
    cols = [("step", None), ("measured ΔH", "dH_measured"), ("tabular (E6 sum)", "dH_tabular"),
            ("JVP (network first order)", "dH_jvp"), ("JVP / measured", None)]
    keys = {name: next((k for k in KEYS[name] if any(k in r for r in rows)), None)
            for _, name in cols if name}
    if keys["dH_measured"] is None:
        return "(no theory diagnostics in this run: train with --diag-every N)"

    def fmt(x):
        return "—" if not isinstance(x, int | float) or not math.isfinite(x) else f"{x:+.3e}"

    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r.get(keys["dH_measured"])
        if not isinstance(m, int | float):
            continue
        j = r.get(keys["dH_jvp"]) if keys["dH_jvp"] else None
        ratio = j / m if isinstance(j, int | float) and m else None
        vals = [str(r["step"]), fmt(m), fmt(r.get(keys["dH_tabular"]) if keys["dH_tabular"] else None),
                fmt(j), "—" if ratio is None else f"{ratio:.3f}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(run_dir: str | Path, out: str | Path | None = None) -> int:
    """``entdyn plot``: write the figures, print where they are and the predicted-vs-measured ΔH table."""
    for p in plot_run(run_dir, out):
        print(p)
    print()
    print(delta_h_table(load_metrics(run_dir)))
    return 0
