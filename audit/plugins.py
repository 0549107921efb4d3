"""Entry-point plugins: third-party packages add probes and model families.

A package declares, in its `pyproject.toml`,

    [project.entry-points."mmaudit.probes"]
    my_probe = "my_package.my_probe:MyProbe"          # a probes.base.Probe subclass with a `spec`

    [project.entry-points."mmaudit.adapters"]
    my_family = "my_package.my_family:FAMILY"          # an audit.adapters.families.Family

and mmaudit finds them after `pip install my-package`, beside the built-in registries.
Built-in names cannot be replaced: a duplicate raises.
"""
from __future__ import annotations

from importlib import metadata

__all__ = ["entry_points"]


def entry_points(group: str) -> list[metadata.EntryPoint]:
    """Installed entry points of `group`, sorted by name (deterministic load order)."""
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)
