"""Key paths of pytrees (params dicts, Flax NNX states) as plain strings."""

from __future__ import annotations


def path_keys(path) -> tuple[str, ...]:
    """The keys of a JAX key path as strings, e.g. ("layers", "0", "attn", "q_proj", "kernel").

    Dict keys (`DictKey.key`), sequence indices (`SequenceKey.idx`) and attribute
    names (`GetAttrKey.name`) alike, so layer 0 of a dict and of a list read the same.
    """
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
