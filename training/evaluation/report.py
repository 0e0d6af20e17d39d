"""Sweep summaries in the paper's form: AUC ranges with 95% CIs (Tables 2/3), best/worst-10, the paper's
numbers beside ours, the two claims tested per combination, and a Figure 3-style plot.

Confidence intervals are Student-t intervals over seeds (per combination) or over combinations (for
means and paired differences): with two seeds t(0.975, 1) = 12.7, so they are wide, honestly.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from training.evaluation.paper import RANGES_2, paper_auc
from training.evaluation.protocol import load_results

METHOD_LABELS = {
    "deepmad": "DeepMAD",
    "deepsvdd": "DeepSVDD",
    "deepsvdd-m": "DeepSVDD(m)",
    "drocc": "DROCC",
    "drocc-m": "DROCC(m)",
}
CSV_FIELDS = [
    "dataset", "method", "combo", "seed", "auc", "auc_dempster_shafer", "tpr_at_threshold", "fpr_at_threshold",
    "test_score_std", "test_score_unique_share", "n_train", "n_test", "train_seconds", "total_seconds", "device",
]  # fmt: skip
COLLAPSE_UNIQUE_SHARE = 0.1  # fewer distinct test scores than this share means a collapsed detector


def _c(combo: str) -> str:
    return combo.replace("-", ", ")


def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); nan half-width for a single value."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def fmt(mean: float, half: float | None = None) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if half is None or math.isnan(half) else f"{mean:.4f} ± {half:.4f}"


def per_combo(rows: list[dict], field: str = "auc") -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> combo -> (mean over seeds, CI half-width, seeds)."""
    grouped: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get(field) is not None:
            grouped[row["method"]][row["combo"]].append(row[field])
    return {
        method: {combo: (*mean_ci(values), len(values)) for combo, values in combos.items()}
        for method, combos in grouped.items()
    }


def range_table(rows: list[dict], methods: list[str], dataset: str) -> list[str]:
    table = per_combo(rows)
    ds_table = per_combo(rows, "auc_dempster_shafer")
    paper = RANGES_2.get(dataset, {})
    lines = [
        "| method | worst (combo) | best (combo) | mean over combos | D–S mean | paper worst ↔ best (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        combos = table.get(method, {})
        if not combos:
            continue
        worst = min(combos, key=lambda c: combos[c][0])
        best = max(combos, key=lambda c: combos[c][0])
        mean, half = mean_ci([v[0] for v in combos.values()])
        ds = ds_table.get(method, {})
        ds_text = fmt(*mean_ci([v[0] for v in ds.values()])) if ds else "–"
        p = paper.get(method)
        p_text = f"{p[0]:.4f} ↔ {p[1]:.4f}" + (f" ({p[2]:.4f})" if p and p[2] else "") if p else "–"
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} | ({_c(worst)}) {fmt(*combos[worst][:2])} | "
            f"({_c(best)}) {fmt(*combos[best][:2])} | {fmt(mean, half)} | {ds_text} | {p_text} |"
        )
    return lines


def combo_table(rows: list[dict], methods: list[str], dataset: str) -> list[str]:
    table = per_combo(rows)
    combos = sorted({r["combo"] for r in rows}, key=lambda c: tuple(int(x) for x in c.split("-")))
    lines = [
        "| combo | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for combo in combos:
        cells = []
        for method in methods:
            mean, half, _ = table.get(method, {}).get(combo, (math.nan, math.nan, 0))
            paper = paper_auc(dataset, method, tuple(int(x) for x in combo.split("-")))
            cells.append(fmt(mean, half) + (f" (paper {paper:.4f})" if paper is not None else ""))
        lines.append(f"| ({_c(combo)}) | " + " | ".join(cells) + " |")
    return lines


def best_worst(rows: list[dict], methods: list[str], count: int = 10) -> list[str]:
    table = per_combo(rows)
    lines = []
    for method in methods:
        combos = table.get(method, {})
        ranked = sorted(combos, key=lambda c: combos[c][0], reverse=True)
        lines += [f"**{METHOD_LABELS.get(method, method)}**", "", "| rank | best | worst |", "|---|---|---|"]
        worst = list(reversed(ranked))
        for k in range(min(count, len(ranked))):
            top, bottom = ranked[k], worst[k]
            lines.append(f"| {k + 1} | ({_c(top)}) {combos[top][0]:.4f} | ({_c(bottom)}) {combos[bottom][0]:.4f} |")
        lines.append("")
    return lines


def paired(rows: list[dict], better: str, worse: str) -> dict | None:
    """Per-combination mean AUC difference better - worse over the shared combinations."""
    table = per_combo(rows)
    shared = sorted(set(table.get(better, {})) & set(table.get(worse, {})))
    if not shared:
        return None
    diffs = [table[better][c][0] - table[worse][c][0] for c in shared]
    mean, half = mean_ci(diffs)
    return {"better": better, "worse": worse, "mean_difference": mean, "ci": half,
            "wins": int(sum(d > 0 for d in diffs)), "combos": len(shared)}  # fmt: skip


def claims(rows: list[dict]) -> list[dict]:
    pairs = [("deepsvdd", "deepsvdd-m"), ("drocc", "drocc-m")]
    pairs += [("deepmad", other) for other in ["deepsvdd", "deepsvdd-m", "drocc", "drocc-m"]]
    return [c for c in (paired(rows, a, b) for a, b in pairs) if c]


def claim_lines(found: list[dict]) -> list[str]:
    lines = ["| claim | mean AUC difference ± 95% CI over combos | combos won | holds? |", "|---|---|---|---|"]
    for c in found:
        lo, hi = c["mean_difference"] - c["ci"], c["mean_difference"] + c["ci"]
        verdict = "yes" if lo > 0 else ("no (reversed)" if hi < 0 else "not resolved")
        label = f"{METHOD_LABELS[c['better']]} > {METHOD_LABELS[c['worse']]}"
        lines.append(
            f"| {label} | {c['mean_difference']:+.4f} ± {c['ci']:.4f} | {c['wins']}/{c['combos']} | {verdict} |"
        )
    return lines


def plot_per_combo(rows: list[dict], methods: list[str], dataset: str, path: Path) -> None:
    """Figure 3 style: AUC per combination, one series per method, 95% CI error bars, paper values hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = per_combo(rows)
    combos = sorted({r["combo"] for r in rows}, key=lambda c: tuple(int(x) for x in c.split("-")))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(combos) + 2), 4.2))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        xs = np.arange(len(combos)) + (k - (len(methods) - 1) / 2) * width
        values = [table.get(method, {}).get(c, (math.nan, math.nan, 0)) for c in combos]
        means = [v[0] for v in values]
        errors = [0 if math.isnan(v[1]) else v[1] for v in values]
        line = ax.errorbar(xs, means, yerr=errors, fmt="o", ms=5, capsize=2, label=METHOD_LABELS.get(method, method))
        paper = [paper_auc(dataset, method, tuple(int(x) for x in c.split("-"))) for c in combos]
        if any(p is not None for p in paper):
            ax.scatter(xs, [math.nan if p is None else p for p in paper], marker="D", s=30, facecolors="none",
                       edgecolors=line[0].get_color())  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(combos)), [f"({c.replace('-', ',')})" for c in combos])
    ax.set_xlabel("normal classes")
    ax.set_ylabel("test AUC")
    title = f"{dataset} {len(combos[0].split('-'))} in / rest out: mean over seeds, 95% CI"
    if dataset == "cifar10":
        title += "; hollow diamonds: paper"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(out: Path, keys: list[str], command: str) -> dict:
    """results.json/csv, summary.md and auc_per_combo.png from the finished runs among ``keys``."""
    wanted = set(keys)
    rows = [r for r in load_results(out) if r["key"] in wanted]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if not rows:
        return {"runs": 0, "planned": len(keys)}
    dataset = rows[0]["dataset"]
    methods = [m for m in METHOD_LABELS if any(r["method"] == m for r in rows)]
    collapsed = [r["key"] for r in rows if r["test_score_unique_share"] < COLLAPSE_UNIQUE_SHARE]
    found = claims(rows)
    plot_per_combo(rows, methods, dataset, out / "auc_per_combo.png")
    seconds = sum(r["total_seconds"] for r in rows)
    status = "complete" if len(rows) == len(keys) else f"PARTIAL: {len(rows)} of {len(keys)} runs"
    lines = [
        f"# {dataset}: {status}",
        "",
        f"Command: `{command}`",
        "",
        f"Runs: {len(rows)}; run time summed {seconds / 60:.1f} min on {sorted({r['device'] for r in rows})};"
        f" collapsed detectors (under {COLLAPSE_UNIQUE_SHARE:.0%} distinct test scores): {collapsed or 'none'}.",
        "",
        "## AUC range (Table 2/3 form)",
        "",
        *range_table(rows, methods, dataset),
        "",
        "## Per combination (mean ± 95% CI over seeds)",
        "",
        *combo_table(rows, methods, dataset),
        "",
        "## The paper's claims, paired per combination",
        "",
        *claim_lines(found),
        "",
        "## Best and worst 10",
        "",
        *best_worst(rows, methods),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return {"runs": len(rows), "planned": len(keys), "claims": found, "collapsed": collapsed}
