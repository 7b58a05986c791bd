#!/usr/bin/env python
"""How well does the planner's training-free proxy rank candidates by their accuracy after fine-tuning?

On the embedded digits model (vit_digits, its shipped dense weights): the removal order by transfer
entropy on the calibration images (as ``python -m shrink.plan`` computes it), then candidates =
removal prefixes (``--prefixes``) x ToMe r (``--r-values``, constant, from the first block). Each one
is scored by the proxy (no training) and then fine-tuned with ``main_lambda.py --config`` on the plan
file ``python -m shrink.plan`` would write for it, for ``--epochs`` epochs; the fine-tuned accuracy is
the run's best deployable top-1 on the digits val split (with the plan's merging). Spearman's rank
correlation of (-KL) and of top-1 agreement with that accuracy is computed here (average ranks for
ties; scipy is not needed). Writes results.json and table.md into --output-dir.

    python scripts/plan_proxy_check.py --output-dir out/plan_proxy_check          # ~10 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks (correct with ties)."""
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="out/plan_proxy_check")
    p.add_argument("--prefixes", default="0,1,3,5", help="how many layers of the order each candidate removes")
    p.add_argument("--r-values", default="0,1,2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--dilution-epochs", type=float, default=2)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import shrink
    from shrink.data.datasets import build_dataset, calibration_subset
    from shrink.plan import Candidate, Proxy, load_calibration, removal_order
    from shrink.plan.outputs import plan_yaml

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prefixes = [int(v) for v in args.prefixes.split(",")]
    r_values = [int(v) for v in args.r_values.split(",")]
    model = shrink.create_model("vit_digits", pretrained=True).eval()
    images, labels = load_calibration(calibration_subset(build_dataset("digits", "train"), args.calib_images, seed=0))
    order = removal_order(model, images, labels, k=max(prefixes), criterion="transfer_entropy")
    cands = [Candidate(tuple(order[:k]), r) for k in prefixes for r in r_values]
    proxy = Proxy(model, images, labels)
    t_proxy = time.perf_counter()
    scores = [proxy.score(c) for c in cands]
    t_proxy = time.perf_counter() - t_proxy

    rows = []
    for i, (c, s) in enumerate(zip(cands, scores, strict=True)):
        cfg, _ = plan_yaml(c, {"model": "vit_digits", "data_set": "digits", "seed": 0})
        run_dir = out / f"run_{i:02d}"
        cfg_path = out / f"plan_{i:02d}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if not (run_dir / "summary.json").is_file():
            cmd = [sys.executable, "main_lambda.py", "--config", str(cfg_path), "--epochs", str(args.epochs),
                   "--dilution-epochs", str(args.dilution_epochs), "--warmup-epochs", "1", "--output-dir", str(run_dir),
                   "--no-progress", "--num-workers", "0", "--threads", str(args.threads)]
            t = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            print(f"[{i + 1}/{len(cands)}] {c.removed} r={c.tome_r}: {time.perf_counter() - t:.0f} s", flush=True)
        summ = json.loads((run_dir / "summary.json").read_text())
        acc = summ.get("best_acc_with_tome") if c.tome_r else summ["deploy_acc_best"]
        rows.append({"candidate": c.as_dict(), "proxy": s.as_dict(), "acc_finetuned": acc,
                     "acc_start": summ.get("deploy_acc_start"), "dense_acc": summ.get("dense_acc")})

    acc = [r["acc_finetuned"] for r in rows]
    result = {
        "order": order, "epochs": args.epochs, "dilution_epochs": args.dilution_epochs,
        "calib_images": len(images), "threads": args.threads, "candidates": len(rows),
        "spearman_neg_kl_vs_acc": spearman([-r["proxy"]["kl"] for r in rows], acc),
        "spearman_agreement_vs_acc": spearman([r["proxy"]["top1_agreement"] for r in rows], acc),
        "spearman_calib_acc_vs_acc": spearman([r["proxy"]["top1_acc"] for r in rows], acc),
        "proxy_seconds": round(t_proxy, 2), "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "scripts/plan_proxy_check.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| removed | r | proxy KL | top-1 agreement | calib top-1 (no training) | fine-tuned top-1 (%) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["candidate"]
        lines.append(f"| {','.join(map(str, c['removed'])) or '-'} | {c['tome_r']} | {r['proxy']['kl']:.4f} | "
                     f"{r['proxy']['top1_agreement']:.3f} | {r['proxy']['top1_acc']:.3f} | {r['acc_finetuned']:.2f} |")
    lines += ["", f"Spearman (-KL vs fine-tuned top-1): {result['spearman_neg_kl_vs_acc']:.3f}; "
                  f"(top-1 agreement vs fine-tuned top-1): {result['spearman_agreement_vs_acc']:.3f}; "
                  f"{len(rows)} candidates, {args.epochs} epochs each; {result['seconds']:.0f} s in all."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
