"""Loading by shard equals loading whole, on 8 CPU devices (started by
tests/test_shard_loading.py).

    shard_loading.py --dir=D --mode=single
    shard_loading.py --dir=D --mode=multi --process_id=I --port=P

D holds the same random model as D/hf (safetensors) and D/ckpt (our model
directory). `single`: one process with 8 devices loads both onto several
meshes. `multi`: one of two processes with 4 devices each, the mesh
{"fsdp": 8} spanning both. Either way every shard this process holds must equal
the same slice of the whole model loaded on the host, bit for bit, and the
safetensors reads must stay within this process's half. Prints one JSON line.
"""
import argparse
import json
import os

ARGS = argparse.ArgumentParser()
ARGS.add_argument("--dir", required=True)
ARGS.add_argument("--mode", choices=("single", "multi"), required=True)
ARGS.add_argument("--process_id", type=int, default=0)
ARGS.add_argument("--port", type=int, default=0)
ARGS = ARGS.parse_args()
NUM_PROCESSES = 2 if ARGS.mode == "multi" else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // NUM_PROCESSES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import sharding as shd  # noqa: E402
from cai_jax.weights import safetensors_files  # noqa: E402
from cai_jax.weights.loader import load_model  # noqa: E402

ELEMENTS_READ = [0]


def count_safetensors_reads():
    read = safetensors_files.SafetensorsFiles.read

    def counted(self, name, index):
        out = read(self, name, index)
        ELEMENTS_READ[0] += out.size
        return out

    safetensors_files.SafetensorsFiles.read = counted


def shards_equal_whole(sharded, whole) -> bool:
    """Every shard this process holds equals that slice of the host arrays."""
    for (path, placed), host in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(whole)):
        assert placed.shape == host.shape and placed.dtype == host.dtype, (jax.tree_util.keystr(path), placed, host)
        for shard in placed.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), host[shard.index]):
                print("differs:", jax.tree_util.keystr(path), shard.index)
                return False
    return True


def on_param_shardings(model, mesh) -> bool:
    want = shd.param_shardings(model.config, mesh)
    return all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(model.params), jax.tree.leaves(want)))


def logits(cfg, params, mesh):
    import jax.numpy as jnp

    from cai_jax.models.transformer import Transformer, positions_from_mask

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    mask = jnp.ones_like(tokens)
    forward = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens, positions_from_mask(mask), mask)[0]
                      ["logits"], out_shardings=shd.replicated(mesh))
    return np.asarray(forward(params).addressable_data(0))


def single() -> dict:
    """Several meshes and runtime overrides, and the logits of the placed whole model."""
    report = {}
    meshes = {"fsdp8": {"fsdp": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
              "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
    overrides = {"": {}, "+unscanned_bf16_scalar": {"scan_layers": False, "param_dtype": "bfloat16",
                                                    "heads": ("lm", "scalar")}}
    for kind in ("hf", "ckpt"):
        src = f"{kind}:{os.path.join(ARGS.dir, kind)}"
        for suffix, extra in overrides.items():
            whole = load_model(src, extra, to_device=False)
            for mesh_name, sizes in meshes.items():
                mesh = shd.make_mesh(sizes)
                model = load_model(src, extra, mesh=mesh)
                report[f"{kind}/{mesh_name}{suffix}"] = {
                    "equal": shards_equal_whole(model.params, whole.params),
                    "on_param_shardings": on_param_shardings(model, mesh)}
        mesh = shd.make_mesh(meshes["fsdp2_tensor4"])
        whole = load_model(src, to_device=False)
        placed = shd.place(whole.params, shd.param_shardings(whole.config, mesh))
        by_shard = load_model(src, mesh=mesh)
        report[f"{kind}/logits_equal"] = bool(np.array_equal(logits(whole.config, placed, mesh),
                                                             logits(by_shard.config, by_shard.params, mesh)))
    return report


def multi() -> dict:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{ARGS.port}", NUM_PROCESSES, ARGS.process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = shd.make_mesh({"fsdp": 8})
    report = {}
    count_safetensors_reads()
    for kind in ("hf", "ckpt"):
        src = f"{kind}:{os.path.join(ARGS.dir, kind)}"
        ELEMENTS_READ[0] = 0
        model = load_model(src, mesh=mesh)
        read = ELEMENTS_READ[0]
        whole = load_model(src, to_device=False)
        total = sum(x.size for x in jax.tree.leaves(whole.params))
        replicated = sum(x.size for x in jax.tree.leaves(model.params) if x.sharding.is_fully_replicated)
        report[kind] = {"equal": shards_equal_whole(model.params, whole.params),
                        "on_param_shardings": on_param_shardings(model, mesh),
                        "elements_read": read, "half_plus_replicated": (total - replicated) // 2 + replicated}
    # pm_train's starting point (a scalar head on the model) is read the same way.
    from ml_collections import ConfigDict

    from cai_jax.rl_cai.preference import SCALAR_HEAD, init_pm
    src = "hf:" + os.path.join(ARGS.dir, "hf")
    ELEMENTS_READ[0] = 0
    pm = init_pm(ConfigDict({"seed": 0}), src, mesh=mesh)
    read = ELEMENTS_READ[0]
    whole = load_model(src, SCALAR_HEAD, to_device=False)
    # The zero-initialised scalar head is made, not read.
    stored = [x for path, x in jax.tree_util.tree_leaves_with_path(pm.params)
              if "scalar" not in jax.tree_util.keystr(path)]
    total = sum(x.size for x in stored)
    replicated = sum(x.size for x in stored if x.sharding.is_fully_replicated)
    report["pm_init"] = {"equal": shards_equal_whole(pm.params, whole.params),
                         "on_param_shardings": on_param_shardings(pm, mesh), "elements_read": read,
                         "half_plus_replicated": (total - replicated) // 2 + replicated}
    return report


if __name__ == "__main__":
    print(json.dumps(single() if ARGS.mode == "single" else multi()), flush=True)
