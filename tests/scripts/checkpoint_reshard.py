"""Saves a train state from one 8-device mesh and restores it onto others
(started by tests/test_sharding.py in a subprocess with 8 CPU devices)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.models.config import model_config_from_dict  # noqa: E402
from cai_jax.models.transformer import init_params  # noqa: E402
from cai_jax.training import optimizers, train_step as ts  # noqa: E402
from cai_jax.training.checkpoint import Checkpointer, abstract_with_shardings  # noqa: E402


def shardings_for(shape, cfg, opt, abstract):
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])
    return ts.state_shardings(shd.param_shardings(cfg, mesh), opt, abstract, mesh)


def main(directory):
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 512})
    opt = optimizers.make_optimizer(dict(learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="constant"))
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    saved_sh = shardings_for((2, 2, 2), cfg, opt, abstract)
    state = ts.init_train_state(params, opt)
    state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, saved_sh)
    ckpt = Checkpointer(directory)
    ckpt.save(1, state, jax.random.key(11), {"data": {"pos": 3}})
    report = {}
    for shape in [(1, 4, 2), (8, 1, 1), (1, 1, 1)]:
        target_sh = shardings_for(shape, cfg, opt, abstract)
        restored, rng, extra = ckpt.restore(abstract_with_shardings(state, target_sh))
        same = all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
        on_target = restored.params["layers"]["mlp"]["gate_up"]["kernel"].sharding == \
            target_sh.params["layers"]["mlp"]["gate_up"]["kernel"]
        report["x".join(map(str, shape))] = {
            "equal": same, "on_target_sharding": bool(on_target),
            "rng_equal": bool(np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(11)))),
            "extra": extra}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
