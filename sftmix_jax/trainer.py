"""Training: the optimizer, the jitted step with a pluggable loss, the loop with its periodic
evaluation, saving and logging, and one training stage from model to HF export.

The same loop runs the NTP reference stage, the SFTMix stage and the tiny suite's pre-training;
only the loss and the batch sampler differ. State is (params, opt_state) as nnx.State pytrees; a
batch is a pure function of the step and the dropout-free loss needs randomness only from
fold_in(seed, step), so a run restored from a checkpoint at step s continues exactly as if it had
never stopped.
"""
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from sftmix_jax import checkpoints, hf, multihost, scoring, sharding
from sftmix_jax.data import render, sources
from sftmix_jax.data.batching import padding_report
from sftmix_jax.metrics_log import MetricsLog
from sftmix_jax.model import lora
from sftmix_jax.ops import cpu


# ----------------------------------------------------------------------------------------
# Optimizer and step
# ----------------------------------------------------------------------------------------
def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW, linear warmup + cosine decay, global-norm clipping; no decay on norms/biases."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(_decayed, params, is_leaf=lambda x: isinstance(x, nnx.Variable))  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    ), schedule



def _decayed(p):
    """Weight matrices are decayed, norms and biases not; a scan_layers stack's layer axis does not count."""
    if isinstance(p, nnx.Variable):
        return p.replace(p.ndim - sharding.layer_stacked(p) >= 2)
    return p.ndim >= 2


def split_micro(batch, accum: int):
    """[B, ...] -> [accum, B/accum, ...]: contiguous chunks (SFTMix pairs are adjacent rows)."""
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)


def _accumulate(grad_fn, loss_fn, params, frozen, batch, rng, accum: int):
    """(loss, aux, grads) of the batch from `accum` micro-batches in a scan (one gradient live).

    As SFTMIX.md defines the loss: a token mean over the whole batch and one lambda per batch (per
    pair, drawn once for the batch). `loss_fn.whole(batch, rng)` gives each micro-batch the whole
    batch's normalizers (scalars) and its share of any per-pair or per-row values (split like the
    rows), so micro-batch losses, metrics and gradients add up to the batch's. A loss without
    `.whole`: the mean over micro-batches.
    """
    micro = split_micro(batch, accum)
    whole = loss_fn.whole(batch, rng) if hasattr(loss_fn, "whole") else {}
    shares = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in whole.items() if jnp.ndim(v)}
    whole = {k: v for k, v in whole.items() if k not in shares}

    def grads_of(mb, i, share):
        if not hasattr(loss_fn, "whole"):
            return grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
        return grad_fn(params, frozen, mb, rng, {**whole, **share})

    def body(acc, xs):
        (loss, aux), g = grads_of(*xs)
        return jax.tree.map(jnp.add, acc, (g, loss, aux)), None

    first = jax.tree.map(lambda x: x[0], (micro, shares))
    (loss_s, aux_s), g_s = jax.eval_shape(grads_of, first[0], 0, first[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_s, loss_s, aux_s))
    (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum), shares))
    if not hasattr(loss_fn, "whole"):
        return jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    return loss, aux, grads


def make_train_step(graphdef, tx, loss_fn, accum: int = 1, shardings=None, skip_nonfinite=False):
    """step(params, opt_state, batch, rng, frozen=None) -> (params, opt_state, metrics), jitted, donating.

    params: the trained variables; frozen: the rest of the model's state (the base weights under
    LoRA), used but neither differentiated nor updated.
    shardings: (params, opt_state, batch) shardings on a mesh, or None for one device.
    skip_nonfinite: a step whose loss or gradient norm is not finite leaves the state unchanged
    (metrics["skipped"] = 1) instead of poisoning the parameters.
    """

    def loss_of(params, frozen, batch, rng, whole=None):
        model = nnx.merge(graphdef, params, frozen)
        return loss_fn(model, batch, rng) if whole is None else loss_fn(model, batch, rng, whole)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(params, opt_state, batch, rng, frozen):
        if accum == 1:
            (loss, aux), grads = grad_fn(params, frozen, batch, rng)
        else:
            loss, aux, grads = _accumulate(grad_fn, loss_fn, params, frozen, batch, rng, accum)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.global_norm(grads)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "real_tokens": jnp.sum(batch["attention_mask"])}
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
            new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
            metrics["skipped"] = 1 - ok.astype(jnp.int32)
        return new_params, new_opt_state, metrics

    if shardings is None:
        jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=cpu.compiler_options("train"))
    else:  # frozen weights keep the shardings they were loaded with (None: taken from the arrays)
        p_sh, o_sh, b_sh = shardings
        rep = sharding.replicated(b_sh.mesh)
        jitted = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, rep, None), out_shardings=(p_sh, o_sh, rep),
                         donate_argnums=(0, 1), compiler_options=cpu.compiler_options("train"))

    def run(params, opt_state, batch, rng, frozen=None):
        return jitted(params, opt_state, batch, rng, nnx.State({}) if frozen is None else frozen)

    run.jitted = jitted  # for .lower(...) ahead of time (the bench's memory plan, tools/compile_time.py)
    return run


def init_optimizer(tx, params, mesh):
    """Optimizer state created sharded like the parameters it tracks (counts replicated)."""
    p_sh = sharding.state_shardings(params, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    o_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), p_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=is_var)
    return jax.jit(tx.init, out_shardings=o_sh)(params), p_sh, o_sh



class watch_signals:
    """SIGTERM / SIGINT set a flag: the loop finishes its step, saves, and exits non-zero.

    One process only. With several, SIGTERM stays with JAX's preemption notifier, which picks
    one step for all processes to save at (`reached_preemption`), and SIGINT raises at once."""

    def __init__(self):
        self.signaled, self.previous = None, {}
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signaled is not None:  # a second signal: stop now
            self.restore()
            raise KeyboardInterrupt
        logging.warning("signal %d: finishing the current step, saving, then exiting", signum)
        self.signaled = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class _Progress:
    """Per-step metrics pulled to the host one step late (while the next step runs): checked for
    non-finite loss, logged every cfg.log_every steps, shown on the progress bar."""

    def __init__(self, log, desc, log_every, total_steps, start):
        self.log, self.desc, self.log_every, self.total = log, desc, log_every, total_steps
        self.bar = tqdm(total=total_steps, initial=start, desc=desc, dynamic_ncols=True, disable=jax.process_index() != 0,
                        mininterval=0.2 if sys.stderr.isatty() else 15)  # log files get a line per 15 s
        self.skipped, self.clock = [], time.perf_counter()

    def reset_clock(self):  # saving and evals do not count against tokens/s
        self.clock = time.perf_counter()

    def flush(self, pending):
        step, metrics, rows = pending
        metrics = jax.device_get(metrics)
        where = f"at step {step}; example rows of the batch: {rows[rows >= 0][:16].tolist()}"
        if metrics.pop("skipped", 0):
            self.skipped.append(step)
            logging.warning("%s: skipped a batch with non-finite loss %s (%d skipped so far)", self.desc, where,
                            len(self.skipped))
            metrics["skipped_total"] = len(self.skipped)
        elif not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} {where}. The last checkpoint is "
                                     "untouched; set config.train.skip_nonfinite=True to skip such batches")
        now = time.perf_counter()
        metrics["tokens_per_s"] = metrics.pop("real_tokens") / max(now - self.clock, 1e-9)
        self.clock = now
        if step % self.log_every == 0 or step in (1, self.total):
            self.log.write(step, metrics)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)


def _setup(model, cfg, loss_fn, total_steps: int, mesh, desc: str):
    """(graphdef, trained params, frozen rest, optimizer state, step function). The model is already
    sharded over the mesh by hf.load_model. Under LoRA only the adapters are trained, optimised
    and checkpointed; the base weights ride along as `frozen`."""
    graphdef, params, frozen = nnx.split(model, lora.trainable(model), ...)
    logging.info("%s: training %s parameters", desc, lora.count(model))
    tx = make_optimizer(cfg, total_steps)[0]
    opt_state, p_sh, o_sh = init_optimizer(tx, params, mesh)
    step_fn = make_train_step(graphdef, tx, loss_fn, cfg.grad_accum, (p_sh, o_sh, sharding.batch_sharding(mesh)),
                              cfg.get("skip_nonfinite", False))
    return graphdef, params, frozen, opt_state, step_fn


def train(stage_dir, model, batches, eval_examples, loss_fn, cfg, *, mesh, seed, total_steps,
          num_replay=0, pad_id=0, buckets=(512,), desc="train", run_config=None, pack=True):
    """Train `model` for `total_steps` (cfg: config.train), resuming from stage_dir/checkpoints if present;
    saves every cfg.save_every steps, at the C replay steps and at the end. Returns (the model with the
    final parameters, held-out metrics at the final step or None if not evaluated there). pack: config.scoring.pack."""
    graphdef, params, frozen, opt_state, step_fn = _setup(model, cfg, loss_fn, total_steps, mesh, desc)
    keep = checkpoints.replay_steps(total_steps, num_replay) if num_replay else [total_steps]
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    mngr = checkpoints.manager(ckpt_dir, keep_steps=keep, keep_latest=cfg.keep_latest)
    params, opt_state, start = checkpoints.restore_latest(mngr, params, opt_state, ckpt_dir, desc)
    log = MetricsLog(stage_dir, start, enabled=jax.process_index() == 0, wandb_project=cfg.get("wandb_project", ""),
                     run_config=run_config)
    progress, evals, base_rng = _Progress(log, desc, cfg.log_every, total_steps, start), {}, jax.random.key(seed)

    def evaluate(step):
        evals[step] = scoring.heldout_loss(nnx.merge(graphdef, params, frozen), eval_examples, cfg.eval_batch_size,
                                           buckets, pad_id, mesh, pack=pack)
        log.write(step, {f"eval_{k}": v for k, v in evals[step].items()})
        return evals[step]

    if start == 0 and cfg.eval_every and eval_examples:  # the baseline the curve starts from
        evaluate(0)
        progress.reset_clock()
    stop = watch_signals()
    try:  # on any error, let checkpoint writes in flight finish: nothing lost on a crash
        pending = None
        for step in range(start, total_steps):
            batch = batches.batch(step)  # this host's rows
            rows = batch.pop("index")
            params, opt_state, metrics = step_fn(params, opt_state, sharding.global_batch(batch, mesh),
                                                 jax.random.fold_in(base_rng, step), frozen)
            if pending is not None:  # the previous step's metrics, pulled while this step runs
                progress.flush(pending)
            pending, done = (step + 1, metrics, rows), step + 1
            # Preemption: one host alone sees the signal; Orbax's sync point makes all stop at one step.
            preempted = stop.signaled if jax.process_count() == 1 else mngr.reached_preemption(done)
            must_save = done % cfg.save_every == 0 or done in keep or done == total_steps or preempted
            must_eval = bool(eval_examples) and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps)
            if must_save or must_eval:
                progress.flush(pending)
                pending = None
                if must_save:
                    checkpoints.save(mngr, done, params, opt_state,
                                     {"step": done, "epoch": done / batches.steps_per_epoch})
                    log.sync()  # object stores: the rows so far, copied whole
                if must_eval:
                    progress.bar.set_postfix_str(f"eval_loss={evaluate(done)['loss']:.4f}", refresh=False)
                progress.reset_clock()
            if preempted:  # every process stops here, after the same step
                raise multihost.AgreedExit(f"{desc}: stopped by a signal after step {done}; checkpoint saved in "
                                           f"{stage_dir}/checkpoints. Rerun the same command to resume.")
        if pending is not None:
            progress.flush(pending)
    finally:
        stop.restore()
        progress.bar.close()
        mngr.wait_until_finished()
        mngr.close()
        log.close()
    return nnx.merge(graphdef, params, frozen), evals.get(total_steps)


# ----------------------------------------------------------------------------------------
# One training stage: model -> trained model -> HF export + summary
# ----------------------------------------------------------------------------------------
def total_steps(cfg, steps_per_epoch: int) -> int:
    return cfg.steps if cfg.steps > 0 else max(1, int(round(cfg.epochs * steps_per_epoch)))


def export(run, stage: str, model, source: str) -> None:
    """DIR/<stage>/hf (and DIR/<stage>/adapter under LoRA), on every process: weights in
    config.export.dtype, the source's token ids and generation settings, the training prompt format."""
    c = run.config
    template = render.ALPACA_CHAT_TEMPLATE if c.data.template == "alpaca" else None
    hf.save_pretrained(model, os.path.join(run.stage_dir(stage), "hf"), tokenizer=run.tokenizer,
                       dtype=c.get("export", {}).get("dtype") or None, chat_template=template,
                       source=None if source == "init" else hf.resolve(source),
                       adapter_path=os.path.join(run.stage_dir(stage), "adapter") if lora.has_lora(model) else None)


def run_stage(run, stage: str, model_cfg, batches, loss_fn, num_replay: int = 0) -> dict:
    """Load the model (with adapters under LoRA), train it, export it to DIR/<stage>/hf; the summary.

    The held-out metrics are the loop's at the final step, or computed here when the loop had none
    (evals off, or a rerun that found the final checkpoint already saved).
    """
    c = run.config
    held_out = run.data[1]
    model = lora.apply(hf.load_model(model_cfg, seed=c.seed, mesh=run.mesh), c.get("lora"), c.seed, run.mesh)
    sources.check_vocab(run.data[0] + held_out, model.cfg.vocab_size, f"the {stage} model ({model_cfg.source})")
    padding = padding_report(batches, c.data.max_length)
    logging.info("%s: padding fraction %s", stage, padding)
    steps = total_steps(c.train, batches.steps_per_epoch)
    model, ev = train(run.stage_dir(stage), model, batches, held_out, loss_fn, c.train, mesh=run.mesh, seed=c.seed,
                      total_steps=steps, num_replay=num_replay, pad_id=run.pad_id, buckets=c.data.buckets,
                      desc=stage, run_config=c.to_dict(), pack=c.scoring.pack)
    export(run, stage, model, model_cfg.source)
    if ev is None:
        ev = scoring.heldout_loss(model, held_out, c.train.eval_batch_size, c.data.buckets, run.pad_id,
                                  run.mesh, pack=c.scoring.pack) if held_out else {}
    logging.info("%s: final held-out %s", stage, ev)
    return {"heldout": ev, "steps": steps, "padding": padding}
