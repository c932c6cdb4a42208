"""Run folders of the command line: which folder a command writes into, and its ``config.yaml``.

A run folder is ``<trainer.default_root_dir or "runs">/<name>/version_<n>/``. ``fit`` takes a new
version, except ``--ckpt_path last|best``, which continues the latest version of that name;
``validate``/``test``/``predict`` with ``--ckpt_path last|best`` read the latest version;
``--run_dir PATH`` names the folder in every case. ``config.yaml`` is never replaced silently.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> path = choose_run_dir("fit", root=root, name="exp")
    >>> path.endswith("exp/version_0"), latest_run_dir(root, "exp") == path
    (True, True)
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from fnloop._atomic import replacing
from fnloop.cli.config_file import read_config_text
from fnloop.errors import ConfigError
from fnloop.loggers import next_version, resolve_run_dir

__all__ = ["CONFIG_FILE", "SESSION_KEYS", "run_name", "latest_run_dir", "choose_run_dir", "save_config", "differences"]

CONFIG_FILE = "config.yaml"
"""Name of the resolved config saved in each run folder."""

SESSION_KEYS: tuple[str, ...] = ("ckpt_path", "run_dir", "overwrite_config")
"""Config keys that say how a command starts, not what the run is: ignored when comparing configs."""


def run_name(name: str | None, config_files: Sequence[Any] | None) -> str:
    """The run name: ``name``, else the stem of the first config file, else ``"default"``.

    Example:
        >>> run_name(None, ["examples/digits.yaml"]), run_name("exp", None), run_name(None, None)
        ('digits', 'exp', 'default')
    """
    if name:
        return name
    if config_files:
        return pathlib.Path(os.fspath(config_files[0])).stem
    return "default"


def latest_run_dir(root: str, name: str) -> str | None:
    """The ``version_<n>`` folder with the highest ``n`` under ``root/name``, or None.

    Example:
        >>> import tempfile
        >>> latest_run_dir(tempfile.mkdtemp(), "exp") is None
        True
    """
    n = next_version(root, name)
    path = os.path.join(root, name, f"version_{n - 1}")
    return path if n > 0 and os.path.isdir(path) else None


def choose_run_dir(
    stage: str, *, root: str, name: str, run_dir: str | None = None, ckpt_path: str | None = None
) -> str:
    """The run folder of a command (created for ``fit``; it must exist for the other stages).

    Raises:
        ConfigError: a ``--run_dir`` that does not exist (not ``fit``), or no run of that name.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> first = choose_run_dir("fit", root=root, name="exp")
        >>> choose_run_dir("test", root=root, name="exp", ckpt_path="best") == first
        True
    """
    if run_dir is not None:
        if stage != "fit" and not os.path.isdir(run_dir):
            raise ConfigError(f"--run_dir {run_dir}: no such folder; give the folder of a run made by `fnloop fit`")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--run_dir {run_dir}: cannot create it ({err}); give a writable folder") from None
        return run_dir
    if ckpt_path in ("last", "latest", "best"):
        latest = latest_run_dir(root, name)
        if latest is not None:
            return latest
        if stage != "fit":
            raise ConfigError(
                f"--ckpt_path {ckpt_path}: no run folder under {os.path.join(root, name)!r}; run `fnloop fit` with "
                "this config first, or pass --run_dir PATH (or name a checkpoint URL)"
            )
    return resolve_run_dir(root, name)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs.

    Example:
        >>> differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3, "d": 0}})
        ['b.c', 'b.d']
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out.extend(differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in SESSION_KEYS}


def _write(path: str, text: str) -> None:
    with replacing(path) as f:
        f.write(text)


def save_config(run_dir: str, text: str, *, overwrite: bool = False, only_if_missing: bool = False) -> str:
    """Write the resolved config ``text`` (YAML) to ``run_dir/config.yaml``; return its path.

    An existing file with the same config (keys in :data:`SESSION_KEYS` aside) is kept as is.

    Args:
        run_dir: the run folder.
        text: the config as YAML.
        overwrite: replace an existing file that holds a different config.
        only_if_missing: never touch an existing file (evaluation commands).

    Raises:
        ConfigError: the file holds a different config and ``overwrite`` is False; the message
            lists the keys that differ.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_config(folder, "seed: 0\\n")
        >>> _ = save_config(folder, "seed: 0\\nckpt_path: last\\n")   # same run: kept as is
        >>> save_config(folder, "seed: 1\\n")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fnloop.errors.ConfigError: .../config.yaml holds a different config (keys that differ: seed); ...
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(path):
        if only_if_missing:
            return path
        old = yaml.safe_load(read_config_text(path)) or {}
        new = yaml.safe_load(text) or {}
        changed = differences(_comparable(old), _comparable(new))
        if not changed:
            return path
        if not overwrite:
            raise ConfigError(
                f"{path} holds a different config (keys that differ: {', '.join(changed)}); pass --overwrite_config "
                "to replace it, or run with the same config, or use another --run_dir"
            )
    _write(path, text)
    return path
