"""The plan files: ``plan.yaml`` (a ``main_lambda.py --config`` file, checked with RunConfig's own
validation), ``plan.json`` (the record ``benchmark.py --plan`` reads), ``pareto.json``, ``pareto.md`` and
``pareto.png``, each written atomically by :func:`write_outputs`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.plan.candidate import Candidate
from shrink.plan.search import Entry, SearchResult, describe

__all__ = ["OUTPUT_FILES", "check_plan_config", "pareto_markdown", "plan_yaml", "plot_pareto", "write_outputs"]


def _run_config_fields() -> set[str]:
    from shrink.training.config import RunConfig

    return {f.name for f in dataclasses.fields(RunConfig)}


def plan_yaml(cand: Candidate, base: dict[str, Any], tome_train: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``main_lambda.py --config`` settings of ``cand`` on top of ``base``, the ToMe settings that go
    to ``--eval`` only because the installed RunConfig cannot take them in a training run).

    With a RunConfig that knows ``tome_train`` the merging goes into the config: a training run then
    reports the deployable model's top-1 with this merging (and merges while training when ``tome_train``),
    and ``--eval`` of its best/ with the same file applies the same schedule.
    """
    known = _run_config_fields()
    cfg = dict(base)
    if cand.removed:
        cfg["remove_layers"] = list(cand.removed)
        cfg.pop("remove_ratio", None)
    else:
        cfg["remove_ratio"] = 0.0
    if not cand.tome_r:
        return cfg, {}
    tome: dict[str, Any] = {"tome_r": int(cand.tome_r), "tome_start_idx": int(cand.tome_start_idx),
                            "tome_policy": cand.tome_policy}
    if cand.tome_inflection:
        tome["tome_inflection"] = float(cand.tome_inflection)
    if "tome_train" in known and set(tome) <= known:
        cfg.update(tome)
        cfg["tome_train"] = bool(tome_train)
        return cfg, {}
    return cfg, tome


def check_plan_config(cfg: dict[str, Any]) -> None:
    """ShrinkError (one line) unless RunConfig (main_lambda.py) accepts ``cfg`` as it stands."""
    from shrink.training.config import RunConfig

    try:
        RunConfig(**cfg).validate({k: "plan.yaml" for k in cfg}, set(cfg))
    except (ShrinkError, TypeError) as e:
        raise ShrinkError(f"the plan would not be accepted by main_lambda.py: {e}") from None


def _cost_key(table: Any) -> Any:
    key = getattr(table, "key", None)
    if key is None:
        return None
    if dataclasses.is_dataclass(key):
        return dataclasses.asdict(key)
    return key if isinstance(key, dict) else str(key)


def _row(e: Entry, chosen: Entry) -> str:
    c = e.candidate
    s = e.score
    ramp = f"{c.tome_inflection:+g}" if c.tome_inflection else "0"
    mark = " **chosen**" if e is chosen else ""
    return (f"| {e.predicted_speedup:.3f} | {e.predicted_ms:.3f} | {s.kl:.4g} | {s.top1_agreement:.3f} | "
            f"{','.join(map(str, c.removed)) or '-'} | {c.tome_r} | {ramp} | {c.tome_start_idx} | {c.tome_policy} | "
            f"{e.tokens[-1]} |{mark}")


def pareto_markdown(res: SearchResult, title: str = "") -> str:
    head = ("| predicted speed-up | predicted ms | proxy KL | top-1 agreement | removed | r | ramp | start | policy | "
            "tokens out | |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"# Pareto front{': ' + title if title else ''}", "",
             f"Target {res.target.flag} {res.target.value:g}; dense predicted {res.dense_ms:.3f} ms; "
             f"{len(res.entries)} distinct candidates, {res.meeting} meet the target, {len(res.scored)} scored by the "
             f"proxy, {len(res.front)} on the front.", "", head]
    lines += [_row(e, res.chosen) for e in res.front]
    return "\n".join(lines) + "\n"


def plot_pareto(res: SearchResult, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shrink.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [e.predicted_speedup for e in res.scored]
    ys = [max(e.score.kl, 1e-12) for e in res.scored]
    ax.scatter(xs, ys, s=12, c="0.6", label=f"scored ({len(res.scored)})")
    fx = [e.predicted_speedup for e in res.front]
    fy = [max(e.score.kl, 1e-12) for e in res.front]
    ax.plot(fx, fy, "o-", c="tab:blue", ms=4, label="Pareto front")
    ax.scatter([res.chosen.predicted_speedup], [max(res.chosen.score.kl, 1e-12)], s=90, marker="*", c="tab:red",
               zorder=5, label="chosen")
    if res.target.kind == "speedup":
        ax.axvline(res.target.value, ls="--", c="0.3", lw=1, label="target")
    ax.set_xlabel("predicted speed-up (cost table)")
    ax.set_ylabel("proxy: KL(dense || candidate), nats")
    if all(y > 0 for y in ys) and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_title(title or "plan search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


OUTPUT_FILES = ("plan.yaml", "plan.json", "pareto.json", "pareto.md", "pareto.png")


def write_outputs(res: SearchResult, out: str | Path, *, table: Any, base_config: dict[str, Any],
                  record: dict[str, Any], plot: bool = True, title: str = "", tome_train: bool = True,
                  validate: bool = True) -> dict[str, Path]:
    """Write the plan files into ``out`` (atomically, each); returns their paths. ``plan.yaml`` is first
    checked with RunConfig's own validation (``validate``), so main_lambda.py accepts what is written."""
    import yaml

    from shrink.io import atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = res.chosen
    cfg, eval_only = plan_yaml(c.candidate, base_config, tome_train)
    if validate:
        check_plan_config(cfg)
    text = yaml.safe_dump(cfg, sort_keys=False)
    header = [f"# shrink plan: {describe(c.candidate)}",
              f"# predicted speed-up {c.predicted_speedup:.3f}x ({c.predicted_ms:.3f} ms vs dense {res.dense_ms:.3f} ms); "
              f"proxy KL {c.score.kl:.4g}, top-1 agreement {c.score.top1_agreement:.3f}"]
    if eval_only:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in eval_only.items())
        header.append(f"# token merging of this plan (this main_lambda.py merges only with --eval): {flags}")
    paths = {"plan.yaml": atomic_write_text(out / "plan.yaml", "\n".join(header) + "\n" + text)}
    plan = {**record, "target": res.target.as_dict(), "predicted_speedup": c.predicted_speedup,
            "predicted_ms": c.predicted_ms, "dense_predicted_ms": res.dense_ms, "cost_key": _cost_key(table),
            "candidate": c.candidate.as_dict(), "schedule": None, "tokens": c.tokens, "proxy": c.score.as_dict(),
            "gmacs": c.gmacs, "removal_order": list(res.order), "config": cfg, "tome_eval": eval_only,
            "best_reachable": res.best_reachable, "candidates": len(res.entries), "meeting_target": res.meeting,
            "scored": len(res.scored), "cost_validation": getattr(table, "validation", None)}
    plan["schedule"] = c.candidate.schedule(len(c.tokens) - 1)
    paths["plan.json"] = atomic_write_json(out / "plan.json", plan)
    paths["pareto.json"] = atomic_write_json(out / "pareto.json", {
        "target": res.target.as_dict(), "dense_predicted_ms": res.dense_ms, "cost_key": _cost_key(table),
        "front": [e.as_dict() for e in res.front], "scored": [e.as_dict() for e in res.scored],
        "chosen": c.as_dict()})
    paths["pareto.md"] = atomic_write_text(out / "pareto.md", pareto_markdown(res, title))
    if plot:
        plot_pareto(res, out / "pareto.png", title)
        paths["pareto.png"] = out / "pareto.png"
    return paths
