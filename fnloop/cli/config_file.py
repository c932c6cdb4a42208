"""Reading a config file safely: a regular file, of bounded size, valid UTF-8, whose YAML
stays small once its aliases are expanded.

A FIFO or device named as a config would block the command forever, and a few lines of YAML
aliases (an "alias bomb") expand to billions of nodes; both are refused with a
:class:`ConfigError` naming the file before anything parses it.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp(), "c.yaml")
    >>> _ = path.write_text("seed: 1\\n")
    >>> read_config_text(str(path))
    'seed: 1\\n'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import yaml

from fnloop.checkpoint._fs import open_regular
from fnloop.errors import CheckpointError, ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "read_config_text", "check_config_args"]

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused."""
MAX_CONFIG_NODES = 100_000
"""A config whose YAML holds more nodes than this, aliases expanded, is refused."""


def _expanded_size(node: Any, memo: dict[int, int], depth: int = 0) -> int:
    if depth > 200:
        raise ConfigError("nested more than 200 levels deep")
    known = memo.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, memo, depth + 1) for v in node.value)
    else:
        total = 1
    memo[id(node)] = total
    if total > MAX_CONFIG_NODES:
        raise ConfigError(f"expands to more than {MAX_CONFIG_NODES} YAML nodes (aliases included)")
    return total


def read_config_text(path: str) -> str:
    """The text of the config file ``path``, checked (regular file, size, UTF-8, expanded YAML size).

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    try:
        with open_regular(path, path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except CheckpointError as err:
        raise ConfigError(f"config file {err}") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes; a config is a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not valid UTF-8 (byte {err.start}); save it as UTF-8") from None
    try:
        for document in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if document is not None:
                _expanded_size(document, {})
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}; write the values out") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from None
    return text


def check_config_args(argv: Sequence[str]) -> None:
    """Check every file named by ``--config PATH`` or ``--config=PATH`` in ``argv`` (a value that
    names no file is a config given inline, and jsonargparse reads it).

    Example:
        >>> check_config_args(["fit", "--config", "/dev/null"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fnloop.errors.ConfigError: config file /dev/null: not a regular file, ...
    """
    values = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if "\n" not in value and os.path.lexists(value):
            read_config_text(value)
