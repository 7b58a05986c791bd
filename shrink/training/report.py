"""What a run says: a line per epoch on stdout, the warnings about its settings and its starting weights."""
from __future__ import annotations

import sys
from typing import Any

from torch import nn

from shrink.training.config import RunConfig
from shrink.training.state import TrainerState


def weights_record(cfg: RunConfig, model: nn.Module, num_classes: int) -> tuple[dict[str, Any], str | None]:
    """Where the starting weights came from (summary.json, best/ and last/ config.json): ``pretrained``
    (timm's weights), ``finetune`` (--finetune PATH) or ``random``; and whether the classifier head was
    re-initialised because the class count differs (then also the warning line)."""
    if cfg.finetune is not None:
        rec = {"pretrained": False, "source": "finetune", "path": str(cfg.finetune)}
        reinit = list(getattr(model, "shrink_head_reinitialised", []))
        had = "the --finetune checkpoint's"
    elif cfg.pretrained:
        pc = getattr(model, "pretrained_cfg", None) or {}
        where = pc.get("hf_hub_id") or pc.get("url") or pc.get("file")
        rec = {"pretrained": True, "source": "pretrained", "path": str(where) if where else None}
        n = pc.get("num_classes")
        reinit = ["head"] if isinstance(n, int) and n > 0 and n != num_classes else []
        had = f"the pretrained {n}-class"
    else:
        rec, reinit, had = {"pretrained": False, "source": "random", "path": None}, [], ""
    rec["head_reinitialised"] = bool(reinit)
    warning = None
    if reinit:
        warning = (f"{had} classifier head does not fit the {num_classes} classes of the data: it starts "
                   f"re-initialised ({', '.join(reinit)})")
    return rec, warning


def surprising_settings(cfg: RunConfig, ts: TrainerState, lr: float) -> list[str]:
    """Settings that run but surprise: a warning line each."""
    lines = []
    if ts.layers and not ts.attention_free and cfg.dilution_epochs >= cfg.epochs:
        lines.append(f"--dilution-epochs {cfg.dilution_epochs:g} >= --epochs {cfg.epochs}: lambda never reaches 0 "
                     f"in this run, so the attention-free model is never trained (best/ is the diluted model "
                     f"evaluated at lambda = 0)")
    if cfg.warmup_epochs >= cfg.epochs:
        lines.append(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the run ends inside the "
                     f"warm-up, so the learning rate never reaches {lr:.3g} (metrics.jsonl: lr)")
    return lines


def say(line: str) -> None:
    """One line of a run's report on stdout (around the progress bars, which are on stderr)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def epoch_line(row: dict[str, Any], epochs: int, phase: str, seconds: float) -> str:
    """The one line printed after each epoch: epoch, phase, lambda, loss, top-1 on the training batches /
    at the current lambda / deployable (lambda = 0; and the EMA's), lr, wall seconds of the epoch."""
    def pct(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.2f}"

    lam = row.get("lambda")
    ema = f" ema {pct('ema_acc_deploy')}" if "ema_acc_deploy" in row else ""
    tome = f" (with ToMe {pct('acc_deploy_tome')})" if "acc_deploy_tome" in row else ""
    return (f"epoch {row['epoch']}/{epochs} {phase}: lambda {'-' if lam is None else f'{lam:.3f}'}, "
            f"loss {row['train_loss']:.4f}, top-1 train {pct('train_acc')} eval {pct('acc')} "
            f"deployable {pct('acc_deploy')}{tome}{ema}, lr {row['lr']:.3g}, {seconds:.1f} s")
