"""XLA:CPU settings (cpu.py): accurate float32 matmuls where the entry points ask for them (never on
import), YNNPACK in the hot steps."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from sftmix_jax.ops import cpu


def relative_error(fn):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 1536)).astype(np.float32)
    b = (0.05 * rng.standard_normal((1536, 576))).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return np.abs(np.asarray(fn(a, b)) - exact).max() / np.abs(exact).max()


def test_default_matmuls_are_as_accurate_as_eigen():
    # conftest asked for them before the backend started, as the command-line entry points do.
    assert f"--{cpu.YNN_FLAG}=" in os.environ["XLA_FLAGS"].split()
    f = jax.jit(lambda a, b: a @ b)
    assert "ynn" not in f.lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
    # YNNPACK: 1.55e-6 here; Eigen: 3.1e-7; numpy's float32 BLAS: 5.6e-7
    assert relative_error(f) < 6e-7


def test_hot_steps_compile_with_ynnpack():
    train, forward = cpu.compiler_options("train"), cpu.compiler_options("forward")
    assert (train, forward) == (cpu.OPTIONS["train"], cpu.OPTIONS["forward"])
    for opts in (train, forward):
        f = jax.jit(lambda a, b: jnp.tanh(a @ b), compiler_options=opts)
        assert "ynn" in f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
        assert relative_error(jax.jit(lambda a, b: a @ b, compiler_options=opts)) < 3e-6  # YNNPACK's rounding


def test_scoring_body_compiles_with_eigen():
    # "forward_body": Eigen's matmuls (and its rounding), whatever XLA_FLAGS' default is
    opts = cpu.compiler_options("forward_body")
    assert opts == cpu.OPTIONS["forward_body"]
    f = jax.jit(lambda a, b: jnp.tanh(a @ b), compiler_options=opts)
    assert "ynn" not in f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    assert relative_error(jax.jit(lambda a, b: a @ b, compiler_options=opts)) < 6e-7


def test_child_processes_treat_the_packages_flag_as_not_the_users():
    # A launcher's or compare's run inherits XLA_FLAGS with the package's flag in it: still not a user choice.
    import subprocess
    import sys

    code = ("from sftmix_jax.ops import cpu; import os; cpu.prefer_accurate_matmuls(); "
            "print(cpu._user_choice(), os.environ['XLA_FLAGS'].count('ynn'))")
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.split()[-2:]
    assert run(dict(os.environ)) == ["False", "1"]  # inherited: recognised, not added twice
    users = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(f"--{cpu.YNN_FLAG}=", f"--{cpu.YNN_FLAG}=X"))
    assert run(users) == ["True", "1"]  # the user's own setting
    assert run({k: v for k, v in os.environ.items() if k != cpu.ADDED_VAR}) == ["True", "1"]  # unmarked: the user's


def test_importing_the_package_changes_no_environment_variable():
    # In a fresh process, without the flag this one was given: importing is not asking.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != cpu.ADDED_VAR}
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(f"--{cpu.YNN_FLAG}=", "").strip()
    code = ("import os; e = dict(os.environ); import sftmix_jax, sftmix_jax.hf, sftmix_jax.model.llama, sftmix_jax.main, "
            "sftmix_jax.trainer, sftmix_jax.stages.evaluate, sftmix_jax.cli.generate; assert dict(os.environ) == e, 'changed'")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_keep_freed_memory_respects_the_users_malloc_settings():
    # In subprocesses: mallopt changes the allocator of the whole process.
    import subprocess
    import sys

    code = "from sftmix_jax.ops import cpu; print(cpu.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.split()[-1]
    assert run(env) == "True"  # glibc on the CPU backend
    assert run({**env, "MALLOC_ARENA_MAX": "2"}) == "False"


def test_hot_step_options_keep_nan_in_softmax_and_logsumexp():
    # xla_cpu_enable_fast_min_max may drop a NaN from a max; the exp and the sum still carry it,
    # so a NaN logit still makes a NaN loss (the trainer's non-finite check).
    x = jnp.array([[1.0, jnp.nan, 3.0], [1.0, 2.0, 3.0]])
    for kind in ("train", "forward", "forward_body"):
        f = jax.jit(lambda x: (jax.nn.logsumexp(x, -1), jax.nn.softmax(x, -1)), compiler_options=cpu.compiler_options(kind))
        lse, probs = f(x)
        assert np.isnan(lse[0]) and np.isnan(probs[0]).all()
        np.testing.assert_allclose(lse[1], np.log(np.exp([1.0, 2.0, 3.0]).sum()), rtol=1e-6)
