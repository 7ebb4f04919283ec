"""The DeepSpeed-side settings checked before the run directory exists, so a refused run leaves nothing behind
(the config's own `validate` covers what needs no device, world size or model)."""
from __future__ import annotations

import torch

from dlscale.train.deepspeed_setup import resolve_engine_settings


def check_engine_settings(cfg, model: torch.nn.Module, world: int, device: torch.device) -> None:
    """Precision on this device, the ds_config (a given `deepspeed.config_file` must exist and agree with `data.*`;
    its precision, ZeRO stage and accumulation become `cfg.deepspeed`'s) and the optimizer's numbers, as the engine
    will use them; raises naming the key."""
    resolve_engine_settings(cfg, world, device)
    try:
        torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                          weight_decay=cfg.optim.weight_decay)
    except (ValueError, TypeError) as err:
        raise ValueError(f"optim: {err} (optim.lr={cfg.optim.lr}, optim.betas={cfg.optim.betas}, "
                         f"optim.weight_decay={cfg.optim.weight_decay})") from None
