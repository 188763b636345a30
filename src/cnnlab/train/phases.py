"""Training phases: one `scratch` phase for networks trained from scratch; for a pretrained
backbone a `frozen` phase (new head only; on cached features by default) and/or a `finetune`
phase (the last N blocks or all of them unfrozen, at a lower learning rate), as the reports and
fastai do. Each phase runs the same fit loop and appears in history.csv under its own name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnnlab.core.config import Config, TrainConfig
from cnnlab.core.errors import UserError


@dataclass(frozen=True)
class Phase:
    name: str  # scratch | frozen | finetune
    train: TrainConfig  # this phase's lr and epochs
    unfreeze: int | str | None  # None: every parameter trains; 0: backbone frozen; N blocks; "all"
    cached: bool  # the head trains on cached backbone features


def plan_phases(cfg: Config, transfer: bool) -> list[Phase]:
    t, m = cfg.train, cfg.model
    has_weights = bool(m.pretrained or m.weights or m.init)
    if not transfer:
        used = [k for k, on in (("model.pretrained", m.pretrained), ("model.weights", m.weights),
                                ("train.freeze", t.freeze), ("train.unfreeze", t.unfreeze)) if on]
        if used:
            raise UserError(f"{used[0]} needs a pretrained backbone (e.g. resnet18, efficientnet_lite0, timm:NAME); "
                            f"{m.name or 'this model'} trains from scratch")
        return [Phase("scratch", t, None, False)]
    if (t.freeze or t.unfreeze) and not has_weights:
        flag = "train.freeze" if t.freeze else "train.unfreeze"
        raise UserError(f"{flag} needs trained backbone weights: add --pretrained, --weights FILE or --from RUN")
    if not has_weights:
        return [Phase("scratch", t, "all", False)]
    unfreeze = "all" if t.unfreeze in ("", "all") else int(t.unfreeze)
    if not t.freeze:
        return [Phase("finetune", t, unfreeze, False)]
    phases = [Phase("frozen", t, 0, t.feature_cache)]
    if t.unfreeze:
        lr = t.finetune_lr or (t.lr / 10 if t.lr != "auto" else "auto")
        phases.append(Phase("finetune", dataclasses.replace(t, lr=lr,
                                                            epochs=t.finetune_epochs or t.epochs), unfreeze, False))
    return phases
