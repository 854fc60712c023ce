"""Train with one YAML config: ``python -m core.bin.train --config conf/opd.yaml [key=value ...]``.

The method (sft | opd | grpo | rest | calibrate, or one registered by the user), model, teacher, data, rollout, losses, optimiser,
backend (torch | deepspeed) and checkpointing all come from the config; ``key=value`` arguments
override it (``optim.lr=1e-4 train.max_steps=50``). ``--print-config-keys`` lists every key.
Multi-process (from the folder the config's relative paths start at, e.g. a recipe's, with
PYTHONPATH=<repository root>): ``torchrun --standalone --nproc_per_node 8 -m core.bin.train ...``,
or across nodes the DeepSpeed launcher, ``deepspeed --hostfile hostfile --module core.bin.train
...`` (every node with the repository at the same path). A recipe's ``run.sh --ngpu 8 [--hostfile
F]`` writes these for you (``tools/recipe_common.sh``). Each method says what runs it
(``core.methods``): ``method: rest`` runs ``core.rest`` (rounds of sampling, filtering by reward
and SFT through the same trainer), the others the trainer's loop.

Exit status: 0 done; 2 bad input found before training (config key, manifest ``file:line``, audio
file, DeepSpeed JSON, vocabulary mismatch), with nothing written to ``output_dir``; 1 the run failed
(non-finite steps, a checkpoint that cannot be written, a teacher that keeps failing), with the
last checkpoint left for ``train.resume: auto``. Errors print as one ``error: ...`` line.
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
    from core.trainer import run  # the method's own driver when it has one (rest), else the trainer
    from core.data.audio import AudioError
    from core.data.manifest import ManifestError
    from core.teacher import TeacherRequestError, TeacherUnavailable, VocabularyMismatch
    from core.trainer import TrainingError
    from core.utils.checkpoint import CheckpointError
    try:
        run(cfg)
    except (C.ConfigError, ManifestError, AudioError, VocabularyMismatch) as e:
        # bad input, found at start-up before anything is trained or written (exit 2)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, TeacherUnavailable, TeacherRequestError) as e:
        # the run failed: non-finite steps, a checkpoint that cannot be written, the teacher (exit 1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
