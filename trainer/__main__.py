"""`python -m trainer [options]`: GRPO training from the command line (see `--help`)."""

from __future__ import annotations

import sys

from trainer.config import SetupError, parse_config


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    if not torch.accelerator.is_available():  # DeepSpeed, when installed, would pick the CPU with a warning on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = parse_config(argv)
    try:
        return _run(cfg)
    except SetupError as err:  # a model, dataset, checkpoint or reward function the options name: as a bad option
        print(f"python -m trainer: error: {err}", file=sys.stderr)
        return 2


def _run(cfg) -> int:
    if cfg.dry_run_memory:
        import torch
        from accelerate import PartialState

        from trainer.model import estimate_memory, format_memory, model_config

        state = PartialState(cpu=not torch.cuda.is_available())
        if state.is_main_process:
            print(f"Estimated memory per process ({state.num_processes} process(es)):")
            print(format_memory(estimate_memory(cfg, model_config(cfg), state.num_processes)))
        return 0
    from trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:  # leave the process group before exit: gloo aborts a process that exits with it open
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
