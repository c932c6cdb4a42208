"""The ``fnloop`` command line: ``fit``, ``validate``, ``test`` and ``predict`` from a YAML config.

::

    fnloop fit --config examples/digits.yaml                        # train, validate, checkpoint, log, test
    fnloop fit --config examples/digits.yaml --trainer.max_epochs 3 --optimizer.lr 3e-3
    fnloop fit --config examples/digits.yaml --print_config         # the resolved config, then exit
    fnloop fit --config examples/digits.yaml --ckpt_path last       # resume the latest run of that name
    fnloop test --config examples/digits.yaml --ckpt_path best      # the best checkpoint of the latest run

Config keys (each one can be overridden with a dotted flag, e.g. ``--trainer.max_epochs 3``):
``seed``, ``name`` (default: the config file's stem), ``model`` (class_path/init_args of a
``torch.nn.Module``), ``loss_fn``, ``metric_fn`` (default: loss_fn), ``predict_fn`` (import paths),
``data`` (class_path/init_args of a data module), ``optimizer`` (``{name: adamw, lr: ..., ...}``: a
``fnloop.optim`` alias and its arguments), ``schedule`` (``{name: warmup_cosine, init_args: {...}}``:
becomes the optimizer's ``lr``; its peak defaults to ``optimizer.lr``), ``trainer`` (every
``fnloop.Trainer`` flag, ``callbacks`` as class_path/init_args entries, ``loggers``: ``tensorboard``,
``csv``, ``jsonl``, ``console`` or class_path entries), ``checkpoint`` (``fnloop.CheckpointManager``
arguments; ``checkpoint: null`` or ``trainer.enable_checkpointing: false`` turns checkpointing off),
``ckpt_path`` (``last``, ``best`` or a URL), ``test_after_fit``.

Run folders are ``<trainer.default_root_dir or runs>/<name>/version_<n>/`` and hold
``config.yaml``, the loggers' files and ``checkpoints/``. ``fit --ckpt_path last`` without
``--run_dir`` resumes the latest version of that name; ``--run_dir PATH`` picks the folder; a
``config.yaml`` that differs from the new config is only replaced with ``--overwrite_config``.
Import paths are resolved with the current folder on ``sys.path``.

Exit codes: 0 done; 2 configuration error (the message names the key and the accepted values,
or the ``--ckpt_path`` that names no checkpoint; nothing is created); 130 ``fit`` stopped by
SIGINT (Ctrl-C) and 143 by SIGTERM or SIGUSR1, after saving a checkpoint; 1 any other failure
(an fnloop error, such as a damaged checkpoint, prints its message; anything else its traceback).

Example:
    >>> main(["fit", "--trainer.max_epochs", "x"])  # doctest: +SKIP
    2
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from fnloop.errors import ConfigError, FnloopError

__all__ = ["main", "EXIT_CONFIG", "EXIT_FAILED"]

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fnloop`` command line; return the exit code (``--help`` and ``--print_config``
    exit 0 through ``SystemExit``).

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Example:
        >>> main(["fit", "--config", "examples/digits.yaml", "--print_config"])  # doctest: +SKIP
        seed: 0
        ...
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # config import paths are relative to where fnloop runs
    stage = next((a for a in argv if not a.startswith("-")), "")
    label = f"fnloop {stage}" if stage in ("fit", "validate", "test", "predict") else "fnloop"
    try:
        from fnloop.cli.config_file import check_config_args
        from fnloop.cli.job import build_job
        from fnloop.cli.parser import build_parser
        from fnloop.cli.run import run_job

        check_config_args(argv)  # a FIFO, a huge file, bad UTF-8 or an alias bomb is refused unread
        parser = build_parser()
        stage, cfg = parser.parse(argv)
        label = f"fnloop {stage}"
        return run_job(build_job(stage, cfg, parser.stage_parsers[stage]))
    except ConfigError as err:
        print(f"{label}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except FnloopError as err:  # an unreadable checkpoint & co.: the message says which file and why
        print(f"{label}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # noqa: BLE001 - any other failure: the traceback and exit 1
        traceback.print_exc()
        return EXIT_FAILED
