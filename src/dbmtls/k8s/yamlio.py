"""YAML out the way people write Kubernetes manifests: key order kept, multi-line strings as blocks.

The generated sidecar config travels in an environment variable; printed as a ``|`` block it
reads like the config file it is, instead of one line of ``\\n`` escapes.
"""

from __future__ import annotations

from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        # a block scalar cannot carry trailing spaces on a line; those stay quoted
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_all(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16)
