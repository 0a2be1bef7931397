"""Sharding: one PartitionSpec per weight/activation role on a (data, fsdp, tensor) mesh.

A spec axis whose mesh size does not divide the dimension is dropped
(replicated) for that leaf, so tiny test models and odd head counts still load
on any mesh; real models divide evenly.

Inside the model, `constrain` pins activations (batch on the data axes, heads
on tensor) when a mesh is active (`with jax.set_mesh(mesh):`); without one it
does nothing, so single-device code pays nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dami_jax.tree import path_keys

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    embedding: P = P("tensor", "fsdp")  # (V, D)
    q_proj: P = P("tensor", None, "fsdp")  # (N, H, D)
    kv_proj: P = P("tensor", None, "fsdp")  # (K, H, D)
    o_proj: P = P("fsdp", "tensor")  # (D, N·H)
    mlp_in: P = P("tensor", "fsdp")  # (F, D)
    mlp_out: P = P("fsdp", "tensor")  # (D, F)
    router: P = P(None, "fsdp")  # (E, D)
    expert_in: P = P(None, "fsdp", "tensor")  # (E, D, F)
    expert_out: P = P(None, "tensor", "fsdp")  # (E, F, D)
    lm_head: P = P("tensor", "fsdp")  # (V, D)
    norm: P = P(None)  # (D,) and (H,)
    batch: P = P(("data", "fsdp"))  # leading batch axis of activations and inputs
    heads: P = P(("data", "fsdp"), None, "tensor")  # (B, T, N, H) activations, (B, S, K, H) cache

    def role_spec(self, path: tuple[str, ...]) -> P:
        """The spec of a param (by its path), written for its plain (non-delta) rank."""
        name = "/".join(str(p) for p in path)
        if path[-1] == "bias":  # (out,): split as its kernel's output axis
            return P(self.role_spec((*path[:-1], "kernel"))[0])
        if path[0] == "visual":  # the Qwen3-VL vision tower is small: replicated
            return P()
        if path[-1] == "scale":
            return self.norm
        if name.startswith("embed/"):
            return self.embedding
        if name.startswith("lm_head/"):
            return self.lm_head
        module = path[-2] if path[-1] == "kernel" else path[-1]
        expert = path[-1] != "kernel"  # MoE expert stacks are bare params
        table = {
            "q_proj": self.q_proj, "k_proj": self.kv_proj, "v_proj": self.kv_proj,
            "o_proj": self.o_proj, "router": self.router,
            "gate_proj": self.expert_in if expert else self.mlp_in,
            "up_proj": self.expert_in if expert else self.mlp_in,
            "down_proj": self.expert_out if expert else self.mlp_out,
        }
        if module not in table:
            raise KeyError(f"no sharding role for param {name!r}")
        return table[module]


ACTIVATIONS = ShardingConfig()  # the rules the model pins its activations with (`constrain`)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one axis takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(shape), AXES)


def fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """Drop spec axes that do not divide their dimension or are not in the mesh; pad to the rank."""
    out = []
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        names = tuple(n for n in names if n in mesh.shape)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        out.append((names if len(names) > 1 else names[0]) if names and dim % size == 0 else None)
    return P(*out)


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """x constrained to `spec` (fitted to its shape) under an active mesh; x itself without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


def param_shardings(params, mesh: Mesh, rules: ShardingConfig | None = None):
    """A NamedSharding for every leaf of a params pytree (plain or delta-stacked)."""
    rules = rules or ShardingConfig()

    def one(path, leaf):
        keys = path_keys(path)
        spec = rules.role_spec(keys)
        # Leading axes beyond the role's rank (delta mode's (Θ_I, Δ), stacked layers) are replicated.
        spec = P(*([None] * (len(leaf.shape) - len(spec))), *spec)
        return NamedSharding(mesh, fit_spec(spec, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, ndim: int, rules: ShardingConfig | None = None) -> NamedSharding:
    rules = rules or ShardingConfig()
    return NamedSharding(mesh, P(*rules.batch, *([None] * (ndim - 1))))
