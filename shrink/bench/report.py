"""Benchmark report output: the JSON schema name, markdown table, CSV and PNG (all written atomically)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from shrink.io import atomic_write, atomic_write_json, atomic_write_text

SCHEMA = "shrink.bench/1"


# ------------------------------------------------------------------------------------------------
# Output: markdown, CSV, PNG
# ------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "variant", "label", "removed_layers", "tome_r", "tome_start_idx", "params",
               "gmacs", "batch_size", "images_per_s", "images_per_s_min", "images_per_s_max",
               "speedup_vs_dense", "speedup_vs_baseline", "latency_ms", "peak_memory_mb", "memory_growth_mb",
               "train_images_per_s", "device", "precision", "compile", "notes")


def _row(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"], "variant": r["variant"], "label": r["label"],
            "removed_layers": " ".join(map(str, r["removed_layers"] or [])),
            "tome_r": (r["tome"] or {}).get("r"), "tome_start_idx": (r["tome"] or {}).get("start_idx"),
            "params": r["params"]["total"], "gmacs": r["gmacs"], "batch_size": r["inference"]["batch_size"],
            "images_per_s": r["inference"]["images_per_s"], "images_per_s_min": r["inference"]["images_per_s_min"],
            "images_per_s_max": r["inference"]["images_per_s_max"], "speedup_vs_dense": r["speedup_vs_dense"],
            "speedup_vs_baseline": r.get("speedup_vs_baseline"),
            "latency_ms": (r["latency_ms"] or {}).get("median"), "peak_memory_mb": (r["memory"] or {}).get("peak_mb"),
            "memory_growth_mb": (r["memory"] or {}).get("growth_mb"),
            "train_images_per_s": (r["train"] or {}).get("images_per_s"),
            "device": s["device"], "precision": s["precision"], "compile": s["compile"],
            "notes": "; ".join(r["notes"])}


def _has_runtimes(report: dict[str, Any]) -> bool:
    return any("runtime" in r for r in report["results"])


def format_csv(report: dict[str, Any]) -> str:
    """One row per configuration, columns :data:`CSV_COLUMNS` (+ ``runtime`` in runs with onnxruntime)."""
    buf = io.StringIO()
    runtimes = _has_runtimes(report)
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS + (("runtime",) if runtimes else ()), lineterminator="\n")
    w.writeheader()
    for r in report["results"]:
        row = _row(r, report["settings"])
        if runtimes:
            row["runtime"] = r.get("runtime", "torch")
        w.writerow(row)
    return buf.getvalue()


def format_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table, with the settings and notes underneath."""
    s = report["settings"]
    mem = "peak mem (MB)" if s["device"].startswith("cuda") else "mem growth (MB)"
    runtimes = _has_runtimes(report)
    baseline = s.get("baseline")
    noted = bool(report["skipped"]) or any(r["notes"] for r in report["results"])
    planned = "plan" in report  # benchmark.py --plan: the planner's predicted speed-up beside the measured one
    head = ["model", "configuration"] + (["runtime"] if runtimes else []) + [
        "params (M)", "GMACs", f"img/s (batch {s['batch_size']})", "speedup"] + (
        ["predicted"] if planned else []) + (
        [f"vs {baseline}"] if baseline else []) + ["latency b1 (ms)", mem] + (
        ["train img/s"] if s["train"] else []) + (["note"] if noted else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: list[tuple[str, list[str]]] = []  # (model, cells)
    for r in report["results"]:
        inf = r["inference"]
        ips = f"{inf['images_per_s']:.1f} ({inf['images_per_s_min']:.1f}-{inf['images_per_s_max']:.1f})"
        if inf["oom_halvings"]:
            ips += f" @b{inf['batch_size']}"
        lat = r["latency_ms"]
        m = None if r["memory"] is None else (
            r["memory"]["peak_mb"] if s["device"].startswith("cuda") else r["memory"]["growth_mb"])
        cells = [r["model"], r["label"]] + ([r.get("runtime", "torch")] if runtimes else []) + [
            f"{r['params']['total'] / 1e6:.2f}", f"{r['gmacs']:.4g}", ips,
            "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"]
        if planned:
            cells.append("-" if r.get("predicted_speedup") is None else f"{r['predicted_speedup']:.2f}x")
        if baseline:
            v = r.get("speedup_vs_baseline")
            cells.append("-" if v is None else f"{v:.2f}x")
        cells += ["-" if lat is None else f"{lat['median']:.2f}", "-" if m is None else f"{m:.0f}"]
        if s["train"]:
            cells.append("-" if r["train"] is None else f"{r['train']['images_per_s']:.1f}")
        if noted:
            cells.append("; ".join(n.replace("|", "/") for n in r["notes"]))
        rows.append((r["model"], cells))
    for k in report["skipped"]:  # a row for every skipped configuration, after its model's last row
        cells = [k["model"], f"{k['variant']}: not measured"] + ["-"] * (len(head) - 3) + [
            "skipped: " + k["reason"].replace("|", "/")]
        at = max((i + 1 for i, (name, _) in enumerate(rows) if name == k["model"]), default=len(rows))
        rows.insert(at, (k["model"], cells))
    lines += ["| " + " | ".join(cells) + " |" for _, cells in rows]
    env = report["environment"]
    where = env["gpu"] or f"{env['cpu']}, {env['torch_threads']} threads"
    lines += ["", f"{s['device']} ({where}), {s['precision']}, compile={s['compile']}, "
              f"warm-up {s['warmup']}, {s['iters']} timed iterations x {s['repeats']} repeats: "
              f"img/s is the median (min-max) of the repeats"
              + (f"; allocator {env['allocator']}." if env.get("allocator") else ".")]
    if runtimes:
        lines += ["speedup: against dense in the same runtime; onnxruntime rows: the model exported with "
                  "shrink.deploy.to_onnx (dynamic batch), all graph optimisations, "
                  + ", ".join(sorted({p for r in report["results"] if "onnx" in r for p in r["onnx"]["providers"][:1]}))
                  + (f", {s['device']} only (compile / channels-last / training apply to torch rows)")]
    if baseline:
        lines += [f"speedup: over the model's own dense row; vs {baseline}: over {baseline}'s dense row"
                  + (" in the same runtime" if runtimes else "") + "."]
    lines += [f"skipped: {k['model']} {k['variant']}: {k['reason']}" for k in report["skipped"]]
    if planned:
        pl = report["plan"]
        lines += [f"plan {pl['path']}: measured speed-up "
                  + ("-" if pl["speedup"] is None else f"{pl['speedup']:.2f}x") + ", predicted "
                  + ("- (no plan record beside it)" if pl["predicted_speedup"] is None else
                     f"{pl['predicted_speedup']:.2f}x ({pl['record_path']}, cost table "
                     f"{(pl['cost_key'] or {}).get('runtime', '?')}, batch {(pl['cost_key'] or {}).get('batch_size', '?')})")]
    return "\n".join(lines) + "\n"


def plot_png(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG of inference images/s against GMACs, one labelled point per configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    for i, name in enumerate(models):
        rs = [r for r in report["results"] if r["model"] == name]
        y = [r["inference"]["images_per_s"] for r in rs]
        err = [[v - r["inference"]["images_per_s_min"] for v, r in zip(y, rs, strict=True)],
               [r["inference"]["images_per_s_max"] - v for v, r in zip(y, rs, strict=True)]]
        ax.errorbar([r["gmacs"] for r in rs], y, yerr=err, fmt="o", capsize=3, label=name, color=f"C{i % 10}")
        for r in rs:
            ax.annotate(r["label"], (r["gmacs"], r["inference"]["images_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    s = report["settings"]
    ax.set_xlabel("GMACs per image (fvcore)")
    ax.set_ylabel(f"images/s (batch {s['batch_size']}, {s['precision']}, {s['device']})")
    ax.margins(0.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_outputs(report: dict[str, Any], json_path: str | None = None, csv_path: str | None = None,
                  plot_path: str | None = None) -> None:
    """Write the report as JSON, CSV and PNG (each atomically; None skips it)."""
    if json_path:
        atomic_write_json(json_path, report)
    if csv_path:
        atomic_write_text(csv_path, format_csv(report))
    if plot_path:
        plot_png(report, plot_path)
