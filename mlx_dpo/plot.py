"""``python -m mlx_dpo.plot ADAPTER_DIR``: draw ``metrics.jsonl`` as a PNG.

Panels for loss, reward accuracy, reward margin and chosen/rejected rewards
(online runs: loss, sampled reward, KL and entropy, completion length),
train (line) and eval (markers) together; panels whose metrics were never
logged are marked "not logged" (a run with only a loss, such as SFT, gets the
loss panel alone). Needs matplotlib: ``pip install matplotlib`` (or the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

FILE = "metrics.jsonl"  # as in metrics_log, which imports mlx: not needed here
WIDTH, HEIGHT, DPI = 12, 8, 120

# (title, y label, zero line, [(metric, legend label, colour)])
PANELS = [
    ("Loss", "loss", False, [("loss", "", "tab:blue")]),
    ("Reward accuracy", "accuracy", False, [("rewards/accuracies", "", "tab:purple")]),
    ("Reward margin", "chosen − rejected", True, [("rewards/margins", "", "tab:orange")]),
    ("Chosen / rejected rewards", "reward", True,
     [("rewards/chosen", "chosen", "tab:green"), ("rewards/rejected", "rejected", "tab:red")]),
]
# Online runs (GRPO's family) log rewards of samples instead of pair margins.
ONLINE_PANELS = [
    ("Loss", "loss", False, [("loss", "", "tab:blue")]),
    ("Reward", "mean reward", False, [("reward", "", "tab:green")]),
    ("KL from the reference / entropy", "nats per token", False,
     [("kl", "kl", "tab:red"), ("entropy", "entropy", "tab:gray")]),
    ("Completion length", "tokens", False, [("completions/mean_length", "", "tab:orange")]),
]
SPLITS = [("train", "", dict(linestyle="-", linewidth=1.6, alpha=0.85)),
          ("eval", "eval_", dict(linestyle="--", linewidth=1.2, marker="o", markersize=5))]


def series(records: list[dict], metric: str, split: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``metric`` in ``split`` (eval records carry the ``eval_`` prefix)."""
    key = ("eval_" if split == "eval" else "") + metric
    pts = sorted((r["step"], r[key]) for r in records
                 if r.get("split", "train") == split and isinstance(r.get(key), (int, float)))
    return [s for s, _ in pts], [v for _, v in pts]


def panels_for(records: list[dict]) -> list:
    """The online panels for a run that logged sampled rewards, else the preference panels."""
    return ONLINE_PANELS if any("reward" in r or "eval_reward" in r for r in records) else PANELS


def panel_names(records: list[dict]) -> list[str]:
    """Titles of the panels that have data, in drawing order."""
    return [t for t, _, _, ms in panels_for(records) if any(series(records, m, s)[0] for m, _, _ in ms for s, _, _ in SPLITS)]


def make_figure(records: list[dict], title: str = ""):
    """The matplotlib figure for ``records`` (imports matplotlib with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    present, candidates = panel_names(records), panels_for(records)
    panels = candidates if len(present) > 1 else [p for p in candidates if p[0] in present] or candidates[:1]
    rows, cols = (2, 2) if len(panels) > 1 else (1, 1)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 13, "axes.titleweight": "bold"}):
        fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, HEIGHT), dpi=DPI, squeeze=False, layout="constrained")
        for ax, (name, ylabel, zero, metrics) in zip(axes.flat, panels):
            ax.set_title(name)
            if name not in present:
                ax.text(0.5, 0.5, f"{metrics[0][0]} not logged", ha="center", va="center", transform=ax.transAxes, fontsize=13, color="gray")
                ax.set_xticks([]), ax.set_yticks([])
                continue
            for metric, label, colour in metrics:
                for split, _, style in SPLITS:
                    x, y = series(records, metric, split)
                    if x:  # a lone point needs a marker to show
                        style = {"marker": "o", **style} if len(x) == 1 else style
                        ax.plot(x, y, color=colour, label=f"{label} ({split})" if label else split, **style)
            if zero:
                ax.axhline(0, color="black", linewidth=0.8, alpha=0.5, zorder=0)
            if name == "Reward accuracy":
                ax.set_ylim(-0.03, 1.03)
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=9, framealpha=0.8)
        if title:
            fig.suptitle(title, fontsize=15)
    return fig


def plot_metrics(records: list[dict], out: Path, title: str = "") -> Path:
    """Write the metrics figure for ``records`` to ``out`` (a PNG); returns ``out``."""
    import matplotlib.pyplot as plt

    fig = make_figure(records, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def run_title(adapter_dir: Path) -> str:
    """The run's folder name and loss type (from ``adapter_config.json`` when present)."""
    name = adapter_dir.resolve().name
    try:
        loss = json.loads((adapter_dir / "adapter_config.json").read_text()).get("loss_type")
    except (OSError, ValueError):
        loss = None
    if isinstance(loss, list):
        loss = " + ".join(map(str, loss))
    return f"{name} — {loss}" if loss else name


def fail(message: str) -> None:
    """One line to stderr, exit status 2."""
    print(f"mlx_dpo.plot: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Plot an adapter folder's metrics.jsonl as a PNG.")
    p.add_argument("adapter_dir", type=Path, help="Folder holding metrics.jsonl (or the file itself).")
    p.add_argument("--out", type=Path, help="PNG to write (default: ADAPTER_DIR/metrics.png).")
    args = p.parse_args(argv)
    path = args.adapter_dir / FILE if args.adapter_dir.is_dir() or not args.adapter_dir.suffix else args.adapter_dir
    folder = path.parent
    if not path.is_file():
        fail(f"{path} not found (training writes it into the adapter folder)")
    try:
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    if not records:
        fail(f"{path} has no records")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("matplotlib is needed: pip install matplotlib (or: pip install -e \".[plot]\" in a checkout)")
    out = plot_metrics(records, args.out or folder / "metrics.png", run_title(folder))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
