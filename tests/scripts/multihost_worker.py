"""A few SFT train steps of the tiny model on a global mesh of 8 CPU devices.

Started by tests/test_multihost.py, either as one of two processes (4 devices
each, `jax.distributed` over 127.0.0.1 with gloo collectives) or as a single
process with all 8 devices. Each process reads its own shard of the examples
(`make_dataset(..., shard_index, shard_count)` from `process_shard()`) and
feeds it with `jax.make_array_from_process_local_data`; the single process
reads both shards and concatenates them, which is the same global batch.
Process 0 writes the final parameters to --out (npz).

    multihost_worker.py --mode=multi --process_id=0 --num_processes=2 --port=P --out=F
    multihost_worker.py --mode=single --out=F
"""
import argparse
import os
import sys


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("multi", "single"), required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args()


ARGS = parse_args()
GLOBAL_DEVICES = 8
LOCAL_DEVICES = GLOBAL_DEVICES // ARGS.num_processes if ARGS.mode == "multi" else GLOBAL_DEVICES
# The device count must be fixed before JAX starts.
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import distributed, sharding as shd  # noqa: E402
from cai_jax.data.loaders import make_dataset, process_shard  # noqa: E402
from cai_jax.models.config import model_config_from_dict  # noqa: E402
from cai_jax.models.transformer import Transformer, init_params  # noqa: E402
from cai_jax.training import lm_loss, optimizers, train_step as ts  # noqa: E402

GLOBAL_BATCH, SEQ, VOCAB, NUM_EXAMPLES = 8, 16, 512, 40
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def examples() -> list[dict]:
    """Rows of random tokens with different real lengths (so the token-count
    denominator matters), the same in every process."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_EXAMPLES):
        length = int(rng.integers(6, SEQ + 1))
        mask = (np.arange(SEQ) < length).astype(np.int32)
        out.append({"tokens": rng.integers(1, VOCAB, SEQ).astype(np.int32) * mask,
                    "attention_mask": mask, "loss_mask": mask, "id": np.int32(i)})
    return out


def dataset(shard_index: int, shard_count: int):
    return iter(make_dataset(examples(), lambda e: e, batch_size=GLOBAL_BATCH // shard_count, seed=3,
                             shard_index=shard_index, shard_count=shard_count))


def main():
    if ARGS.mode == "multi":
        # Collectives between CPU processes (gloo is the default in this JAX; set it anyway).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        config = ml_collections.ConfigDict({"distributed": {
            "enabled": True, "coordinator_address": f"127.0.0.1:{ARGS.port}",
            "num_processes": ARGS.num_processes, "process_id": ARGS.process_id}})
        distributed.maybe_initialize(config)
    assert jax.device_count() == GLOBAL_DEVICES, jax.devices()
    assert jax.local_device_count() == LOCAL_DEVICES

    cfg = model_config_from_dict({"name": "tiny", "vocab_size": VOCAB})
    opt = optimizers.make_optimizer(dict(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                         schedule="cosine", grad_clip_norm=1.0, weight_decay=0.01))
    mesh = shd.make_mesh(MESH, jax.devices())
    params0 = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params0)
    psh = shd.param_shardings(cfg, mesh)
    ssh = ts.state_shardings(psh, opt, abstract, mesh)
    state = jax.jit(lambda p: ts.init_train_state(p, opt), out_shardings=ssh)(shd.place(params0, psh))
    data_sharding = shd.data_sharding(mesh, 2)
    step = ts.build_train_step(lm_loss.make_lm_loss(Transformer(cfg)), opt, mesh, ssh, data_sharding)

    if ARGS.mode == "multi":
        shard_index, shard_count = process_shard()
        streams = [dataset(shard_index, shard_count)]
    else:
        # One process plays both hosts: their shards, in process order.
        streams = [dataset(i, ARGS.num_processes) for i in range(ARGS.num_processes)]

    seen_ids = []
    for i in range(ARGS.steps):
        local = [next(s) for s in streams]
        local = {k: np.concatenate([b[k] for b in local]) for k in ("tokens", "attention_mask", "loss_mask", "id")}
        seen_ids.append(local.pop("id"))
        batch = {k: jax.make_array_from_process_local_data(data_sharding, v, (GLOBAL_BATCH, SEQ))
                 for k, v in local.items()}
        state, metrics = step(state, batch, jax.random.key(i))

    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.params, tiled=True)
    ids = multihost_utils.process_allgather(np.concatenate(seen_ids))
    loss = float(multihost_utils.process_allgather(metrics["loss"], tiled=True))
    if jax.process_index() == 0:
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        moved = max(float(np.abs(np.asarray(a) - b).max())
                    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)))
        np.savez(ARGS.out, loss=loss, moved=moved, ids=np.sort(np.ravel(ids)), **flat)
    if ARGS.mode == "multi":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
    sys.exit(0)
