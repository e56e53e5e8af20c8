"""Writes one run's results: `<stamp>.json` (everything, every sample), `<stamp>.md` (the table the README shows)
and two PNG plots (how much better ours is per comparison, against the target; ours beside the baseline per
scenario, with the spread over repeats as error bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.results import Comparison, Scenario


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "tok/s":
        return f"{value:.2f} tok/s"
    return f"{value:.4g} {unit}".strip()


def _cell(summary: dict) -> str:
    text = _fmt(summary["median"], summary["unit"])
    if summary["n"] > 1:
        text += f" [{_fmt(summary['min'], summary['unit'])} – {_fmt(summary['max'], summary['unit'])}]"
    return text


def _ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.2e}"


def _better(c: dict) -> str:
    b = c["better_by"]
    if not c["competitive"] or b is None or math.isnan(b):
        return "n/a"
    return f"{b:.3g}x better" if b >= 1 else f"{1 / b:.3g}x worse"


def _met(c: dict) -> str:
    return {True: "**yes**", False: "**no**", None: "–"}[c["met"]]


def markdown(doc: dict, plot_names: list[str]) -> str:
    m = doc["machine"]
    cfg = doc["config"]
    lines = [
        f"# InternVL serving benchmark, {doc['stamp']}",
        "",
        (f"**Machine:** {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable, torch uses "
        f"{m['torch_threads']} threads; flags: {', '.join(m['cpu_flags']) or 'none of note'}), {m['memory_gib']} GiB "
        f"RAM{', GPU ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}. Load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in m.get('load_average_at_end', []))}."),
        "",
        (f"**Model:** {cfg['model_description']}. **dtype:** {m['dtype']} ({cfg['dtype_reason']}). "
        f"**Repeats:** {cfg['repeats']}; cells show the median [min – max] over repeats; ratios are ours / baseline "
        f"of the medians. Total wall time {doc['wall_s'] / 60:.1f} min."),
        "",
        "| # | scenario | comparison | ours | baseline | ours / baseline | | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in doc["scenarios"]:
        for c in s["comparisons"]:
            lines.append(
                f"| {s['number']} | {s['title']} | {c['name']} | {c['ours']['label']}: {_cell(c['ours'])} | "
                f"{c['baseline']['label']}: {_cell(c['baseline'])} | {_ratio(c['ratio_ours_over_baseline'])} | "
                f"{_better(c)} | {(c['target'] or {}).get('text', '')} | {_met(c)} |")
    lines += ["", "Setups:", ""]
    lines += [f"{s['number']}. **{s['title']}**: {s['setup']}." for s in doc["scenarios"]]
    for s in doc["scenarios"]:
        for table in s.get("extra", {}).get("tables", []):
            lines += ["", f"**{table['title']}**", "", *_table(table)]
    if plot_names:
        lines += ["", *[f"![{name}]({name})" for name in plot_names]]
    return "\n".join(lines) + "\n"


def _table(table: dict) -> list[str]:
    """A scenario's extra table ({"columns", "units", "rows"}) in markdown; numbers formatted by their column's unit."""
    def cell(value, unit: str) -> str:
        if isinstance(value, str):
            return value
        return _fmt(value, unit) if unit else ("n/a" if value is None or math.isnan(value) else f"{value:.3g}")

    return [f"| {' | '.join(table['columns'])} |", f"|{'---|' * len(table['columns'])}",
            *(f"| {' | '.join(cell(v, u) for v, u in zip(row, table['units'], strict=True))} |"
              for row in table["rows"])]


def plots(doc: dict, out_dir: Path, stamp: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # 1. How many times better ours is, per comparison, with the target where there is one. Yardsticks with a target
    #    (the floors) are shown the same way (a floor at 1.5x reads as 0.67); those without one (weights) are left out.
    rows = [(s, c) for s in doc["scenarios"] for c in s["comparisons"]
            if (c["competitive"] or c["target"]) and not math.isnan(c["better_by"] or math.nan)]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    labels = [f"{s['number']}. {c['name']}" for s, c in rows]
    values = [c["better_by"] for _, c in rows]
    colours = ["#2a9d8f" if c["met"] else "#e76f51" if c["met"] is False else "#8d99ae" for _, c in rows]
    y = range(len(rows))
    ax.barh(list(y), values, color=colours)
    for i, (_, c) in enumerate(rows):
        t = c["target"]
        if t:
            goal = (1 / t["max_ratio"]) if t["max_ratio"] else t["min_ratio"]
            if not c["higher_is_better"] and t["min_ratio"]:
                goal = 1 / t["min_ratio"]
            ax.plot([goal, goal], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("times better than the baseline (log; >1 = ours better; black tick = target)")
    ax.set_title(f"InternVL serving vs transformers, {doc['machine']['dtype']}, {doc['machine']['cpu_model']}")
    fig.tight_layout()
    names.append(f"{stamp}-overview.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    # 2. Absolute figures, ours beside the baseline, one panel per scenario.
    scenarios = doc["scenarios"]
    cols = 2
    fig, axes = plt.subplots((len(scenarios) + 1) // cols, cols, figsize=(13, 3.3 * ((len(scenarios) + 1) // cols)))
    for ax, s in zip(axes.flat, scenarios, strict=False):
        comps = s["comparisons"]
        xs = range(len(comps))
        for offset, side, colour in ((-0.2, "ours", "#2a9d8f"), (0.2, "baseline", "#8d99ae")):
            med = [c[side]["median"] for c in comps]
            low = [max(0.0, c[side]["median"] - c[side]["min"]) for c in comps]
            high = [max(0.0, c[side]["max"] - c[side]["median"]) for c in comps]
            ax.bar([x + offset for x in xs], med, width=0.4, color=colour, yerr=[low, high], capsize=3,
                   label=side)
        units = {c["ours"]["unit"] for c in comps} | {c["baseline"]["unit"] for c in comps}
        ax.set_ylabel(" / ".join(sorted(u for u in units if u)))
        if all(c["ours"]["unit"] == "s" for c in comps):
            ax.set_yscale("log")
        ax.set_xticks(list(xs), [_wrap(c["name"]) for c in comps], fontsize=7)
        ax.set_title(f"{s['number']}. {s['title']}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.axis("off")
    fig.tight_layout()
    names.append(f"{stamp}-scenarios.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def write(doc: dict, out_dir: Path, stamp: str, scenarios: list[Scenario]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "scenarios": [s.to_dict() for s in scenarios]}
    plot_names = plots(doc, out_dir, stamp)
    json_path, md_path = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    json_path.write_text(json.dumps(_clean(doc), indent=2, default=_jsonable, allow_nan=False) + "\n")
    md_path.write_text(markdown(doc, plot_names))
    return {"json": json_path, "markdown": md_path, **{n: out_dir / n for n in plot_names}}


def _clean(value):
    """NaN (a measure that did not run) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Comparison):
        return value.to_dict()
    raise TypeError(f"cannot serialise {type(value).__name__}")
