"""How fast two runs of the same config drift apart: mesh noise vs chaotic training.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/divergence.py \\
        --config configs/tiny.py --mesh 1,4,2 --steps 400
    python tools/divergence.py --config configs/tiny.py --perturb 1e-6 --steps 400

Trains the reference stage's NTP loss twice from the same initial weights on the same batches:
run A on one device, run B on `--mesh` (data,fsdp,tensor; default one device too) with its
initial weights multiplied by (1 + perturb * N(0, 1)). Every `--every` steps it prints both
losses and the relative distance of the parameters, ||A - B|| / ||A||. A sharded reduction
sums in another order than one device (float32 rounding, ~1e-7 relative per step); whether
that stays at 1e-7 or grows to O(1) is a property of the training run, not of the sharding.
Not a test: a measuring tool, like tools/bench.py.
"""
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from sftmix_jax import hf, sharding
from sftmix_jax.data import batching, sources
from sftmix_jax.stages import pretrain
from sftmix_jax.ops import cpu
from sftmix_jax import losses, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:ARG]).")
_MESH = flags.DEFINE_string("mesh", "1,1,1", "Run B's mesh as data,fsdp,tensor (run A: one device).")
_PERTURB = flags.DEFINE_float("perturb", 0.0, "Relative Gaussian noise on run B's initial weights.")
_STEPS = flags.DEFINE_integer("steps", 400, "Steps to train (the schedule is the config's full run).")
_EVERY = flags.DEFINE_integer("every", 25, "Print every this many steps.")
flags.mark_flags_as_required(["config"])


def make_run(c, mesh, total, perturb):
    """(jitted step, params, opt_state) of a fresh NTP run of config c on mesh."""
    with jax.set_mesh(mesh):
        graphdef, params = nnx.split(hf.load_model(c.model, seed=c.seed, mesh=mesh))
        if perturb:
            leaves, tree = jax.tree.flatten(params)
            keys = jax.random.split(jax.random.key(1), len(leaves))
            params = jax.tree.unflatten(tree, [x * (1 + perturb * jax.random.normal(k, x.shape, x.dtype))
                                               for x, k in zip(leaves, keys)])
        tx, _ = trainer.make_optimizer(c.train, total)
        opt_state, p_sh, o_sh = trainer.init_optimizer(tx, params, mesh)
        b_sh = sharding.batch_sharding(mesh)
        step = trainer.make_train_step(graphdef, tx, losses.ntp_loss_fn(c.train.ce_chunk or None), c.train.grad_accum,
                                     (p_sh, o_sh, b_sh))
    return step, params, opt_state


def main(argv):
    del argv
    cpu.prefer_accurate_matmuls()  # before JAX starts its backend: as sftmix_jax.main computes
    c = _CONFIG.value
    d, f, t = (int(x) for x in _MESH.value.split(","))
    mesh_of = lambda d, f, t: sharding.make_mesh(  # noqa: E731 - over the first d*f*t devices
        ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t, dcn_data=1)), jax.devices()[: d * f * t])
    mesh_a, mesh_b = mesh_of(1, 1, 1), mesh_of(d, f, t)
    tokenizer = hf.load_tokenizer(c.tokenizer or c.model.source)
    c = pretrain.resolve(c, tokenizer, mesh_a, tokenizer.pad_token_id or 0)  # the tiny suite's cached base
    train_ex, _, _ = sources.load_examples(c.data, tokenizer, c.seed)
    batches = batching.TrainBatches(train_ex, c.train.batch_size, c.seed, c.data.buckets)
    total = trainer.total_steps(c.train, batches.steps_per_epoch)
    step_a, pa, oa = make_run(c, mesh_a, total, 0.0)
    step_b, pb, ob = make_run(c, mesh_b, total, _PERTURB.value)
    print(f"run A: 1 device; run B: mesh {(d, f, t)}, perturb {_PERTURB.value:g}; {total} steps in the schedule")
    start = time.perf_counter()
    for i in range(min(_STEPS.value, total)):
        b = batches.batch(i)
        b.pop("index")
        rng = jax.random.fold_in(jax.random.key(c.seed), i)
        with jax.set_mesh(mesh_a):
            pa, oa, ma = step_a(pa, oa, sharding.global_batch(b, mesh_a), rng)
        with jax.set_mesh(mesh_b):
            pb, ob, mb = step_b(pb, ob, sharding.global_batch(b, mesh_b), rng)
        if (i + 1) % _EVERY.value == 0:
            diff = optax.global_norm(jax.tree.map(lambda x, y: jnp.asarray(x) - jax.device_get(y), pa, pb))
            rel = float(diff) / float(optax.global_norm(pa))
            la, lb = float(ma["loss"]), float(mb["loss"])
            print(f"step {i + 1:5d}  loss A {la:.6f}  B {lb:.6f}  |dloss| {abs(la - lb):.1e}  "
                  f"||A-B||/||A|| {rel:.1e}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    app.run(main)
