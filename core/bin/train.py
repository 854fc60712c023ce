"""Train with one YAML config: ``python -m core.bin.train --config conf/opd.yaml [key=value ...]``.

The method (sft | opd | grpo | rest | calibrate), model, teacher, data, rollout, losses, optimiser,
backend (torch | deepspeed) and checkpointing all come from the config; ``key=value`` arguments
override it (``optim.lr=1e-4 train.max_steps=50``). ``--print-config-keys`` lists every key.
Multi-process: ``torchrun --nproc_per_node 2 -m core.bin.train ...`` or the DeepSpeed launcher
(``deepspeed --hostfile hostfile -m core.bin.train ...``). ``method: rest`` runs ``core.rest``
(rounds of sampling, filtering by reward and SFT through the same trainer).
"""
from __future__ import annotations

import argparse
import sys

from core import config as C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML training config")
    ap.add_argument("--print-config-keys", action="store_true", help="list every config key with its default and help")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = ap.parse_args(argv)
    if args.print_config_keys:
        print(C.describe())
        return 0
    try:
        cfg = C.load_config(args.config, args.overrides)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.method == "rest":
        from core.rest import run
    else:
        from core.trainer import run
    try:
        run(cfg)
    except C.ConfigError as e:  # found at start-up (e.g. model.load_in_4bit without a GPU)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
