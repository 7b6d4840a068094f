"""Logical axis names -> mesh axes: the one place sharding is declared.

Parameters and activations carry logical names (model.py); this table maps them onto the
mesh axes `data`, `fsdp` and `tensor`. A name missing from the mesh is replicated, so the
same model code runs on one CPU and on a pod.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: FSDP shards the embedding dim over `fsdp`; tensor parallelism shards heads,
# the MLP width and the vocabulary over `tensor`. Activations ("act_*") are batch-sharded
# over data x fsdp and keep their model dims whole except the tensor-parallel ones.
RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_to_spec(names, mesh_axes=MESH_AXES, rules=RULES) -> P:
    """Partition spec for a tuple of logical names; mesh axes absent from the mesh drop out."""
    table = dict(rules)
    used, spec = set(), []
    for name in names:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        target = table.get(name)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis can shard only one dim of an array.
        axes = tuple(a for a in axes if a in mesh_axes and a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x, names):
    """with_sharding_constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh.axis_names))


def named_sharding(mesh, names) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh.axis_names))
