"""Runs three train steps of the tiny model on several meshes of 8 CPU devices and
prints the max difference of loss and parameters to the single-device run (JSON).
Started by tests/test_sharding.py in a subprocess: the device count must be set
before JAX initialises."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.models.config import model_config_from_dict  # noqa: E402
from cai_jax.models.transformer import Transformer, init_params  # noqa: E402
from cai_jax.training import lm_loss, optimizers, train_step as ts  # noqa: E402


def main(mesh_shapes):
    cfg = model_config_from_dict({"name": "tiny", "vocab_size": 512})
    opt = optimizers.make_optimizer(dict(learning_rate=1e-3, warmup_steps=1, total_steps=10,
                                         schedule="cosine", grad_clip_norm=1.0, weight_decay=0.01))
    params0 = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params0)
    rng = np.random.default_rng(0)
    mask = (np.arange(16)[None] < rng.integers(6, 17, (8, 1))).astype(np.int32)
    batch = {"tokens": rng.integers(0, 512, (8, 16)).astype(np.int32), "attention_mask": mask,
             "loss_mask": mask}
    loss_fn = lm_loss.make_lm_loss(Transformer(cfg))
    results = {}
    for shape in [(1, 1, 1)] + mesh_shapes:
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices)
        psh = shd.param_shardings(cfg, mesh)
        state = ts.init_train_state(shd.place(params0, psh), opt)
        step = ts.build_train_step(loss_fn, opt, mesh, ts.state_shardings(psh, opt, abstract, mesh),
                                   shd.data_sharding(mesh, 2), grad_accum_steps=2)
        for i in range(3):
            state, metrics = step(state, batch, jax.random.key(i))
        spec = str(state.params["layers"]["mlp"]["gate_up"]["kernel"].sharding.spec)
        results[shape] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params), spec)
    base_loss, base_params, _ = results[(1, 1, 1)]
    report = {}
    for shape, (loss, params, spec) in results.items():
        diff = max(float(np.abs(a - b).max()) for a, b in
                   zip(jax.tree.leaves(base_params), jax.tree.leaves(params)))
        report["x".join(map(str, shape))] = {"loss_diff": abs(loss - base_loss),
                                             "param_diff": diff, "mlp_gate_up_spec": spec}
    print(json.dumps(report))


if __name__ == "__main__":
    shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[1:]] or [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
    main(shapes)
