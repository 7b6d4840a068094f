"""Run by tests/test_multihost.py as every process of `sftmix_jax.launch --module multihost_worker`:
multihost's helpers across real processes, then process 1 fails while process 0 waits for it."""
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sftmix_jax import multihost


def checks():
    i, n = jax.process_index(), jax.process_count()
    assert multihost.agree({"from": i, "files": ["a"]}) == {"from": 0, "files": ["a"]}
    assert multihost.all_ok(True) and not multihost.all_ok(i != 1)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    local = np.arange(4 * i, 4 * i + 4, dtype=np.float32).reshape(jax.local_device_count(), -1)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)  # rows on every process
    assert not x.is_fully_addressable
    np.testing.assert_array_equal(multihost.fetch(x).ravel(), np.arange(4 * n, dtype=np.float32))
    multihost.barrier("checks")
    print(f"process {i}: checks passed", flush=True)


def main():
    heartbeat = int(sys.argv[1])
    multihost.initialize(heartbeat)
    multihost.label_logs()
    try:
        checks()
        if jax.process_index() == 1:
            raise RuntimeError("injected failure in process 1")
        multihost.barrier("process 1 never comes")
    except BaseException as e:
        multihost.fail_fast(e, heartbeat)
        raise


if __name__ == "__main__":
    main()
