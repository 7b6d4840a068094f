"""Logical axis names -> mesh axes: the one place sharding is declared.

Parameters and activations carry logical names (model.py); this table maps them onto the
mesh axes `data`, `fsdp` and `tensor`. A name missing from the mesh is replicated, so the
same model code runs on one CPU and on a pod.
"""
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LAYERS = "layers"  # logical name of scan_layers' stacked parameters' leading axis

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
    (LAYERS, None),  # scan_layers' stacked parameters: every device holds every layer's slice
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


def batch_shards() -> int:
    """How many ways the current mesh splits activations' batch axis (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = logical_to_spec(("act_batch",), mesh.axis_names)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


def layer_stacked(var) -> bool:
    """Whether a Variable holds every layer's value on a leading "layers" axis (scan_layers)."""
    names = var.get_metadata().get("out_sharding") or ()
    return bool(names) and names[0] == LAYERS


def named_sharding(mesh, names) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh.axis_names))


# ----------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------
def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple:
    """(data, fsdp, tensor) with one -1 inferred; the product must be the device count."""
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = abs(int(np.prod([s for s in shape if s != -1])))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh: {num_devices} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"config.mesh: data*fsdp*tensor = {'*'.join(map(str, shape))} = {int(np.prod(shape))} "
                         f"but there are {num_devices} devices; set one axis to -1 to infer it")
    return tuple(shape)


def make_mesh(cfg, devices=None) -> Mesh:
    """Mesh over axes (data, fsdp, tensor) from config.mesh; `dcn_data` > 1 splits `data` across slices."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg.data, cfg.fsdp, cfg.tensor, len(devices))
    dcn = cfg.get("dcn_data", 1)
    if dcn > 1:  # multi-slice: data parallelism over the slow network, the rest inside a slice
        if shape[0] % dcn:
            raise ValueError(f"config.mesh.dcn_data={dcn} must divide the data axis ({shape[0]})")
        arr = mesh_utils.create_hybrid_device_mesh((shape[0] // dcn, *shape[1:]), (dcn, 1, 1), devices)
    else:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES)


# ----------------------------------------------------------------------------------------
# Parameters, batches
# ----------------------------------------------------------------------------------------
def state_shardings(state, mesh):
    """NamedShardings (same tree as `state`) from each Variable's logical `out_sharding` names."""
    return jax.tree.map(
        lambda v: v.replace(named_sharding(mesh, v.get_metadata().get("out_sharding") or ())),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings: a restore target for Orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh) -> NamedSharding:
    """Batches split over data x fsdp along rows, whole along the sequence."""
    return named_sharding(mesh, ("act_batch",))


def global_batch(local: dict, mesh) -> dict:
    """This host's rows -> global arrays sharded over the batch axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_rows(batch: dict) -> dict:
    """This process's contiguous rows of a batch that every process built whole (eval, replay)."""
    n, p = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, n)[p] for k, v in batch.items()} if n > 1 else batch

