"""Our own model directory (`ckpt:DIR`): shapes, tokenizer and orbax parameters.

    DIR/model.json     TransformerConfig fields
    DIR/about.json     what the next user of the model needs: how its inputs are
                       rendered ("render"), its longest input ("max_seq_len"),
                       the reference it was trained from ("made_from"), the stage
    DIR/tokenizer/     transformers tokenizer files
    DIR/params/        orbax checkpoint of the parameter pytree (scan layout)
    DIR/saved.json     its seal (artifacts.SEAL_FILE): the model's fingerprint, from
                       the parameters' values (params_digest) and the other files,
                       and every file's checksum. The same weights saved twice
                       have the same fingerprint, whatever names orbax gave its
                       files; a changed file no longer matches the seal

Stages hand models to each other in this form (SL-CAI -> pairs, PM -> PPO).
DIR may be a gs:// URL (storage.py). A local directory is assembled under a
temporary name and renamed into place, so a reader never sees half of one.
Cloud Storage has no rename: there the files are written in place, the seal
last, and the pipeline's staging keeps readers from a model being written (a
stage's outputs appear in the work directory only when it has finished).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile

import jax
import numpy as np

from cai_jax import artifacts, processes, storage
from cai_jax.models.config import TransformerConfig
from cai_jax.weights import layout


ABOUT_FILE = "about.json"
# Preference models saved before about.json existed kept their render style here.
_OLD_PM_INFO_FILE = "preference.json"


def save_model_dir(directory: str, cfg: TransformerConfig, params, tokenizer=None,
                   about: dict | None = None) -> None:
    directory = storage.abspath(directory)
    # In a multi-process run every process saves its shards of the parameters
    # into the same directory (process 0's temporary one on a local disk).
    writer = processes.is_writer()
    if storage.is_remote(directory):
        if writer:
            storage.rmtree(directory)
        processes.barrier(f"cleared {directory}")
        _write_model_files(directory, cfg, params, tokenizer, about)
        return
    with storage.local_directory_built(directory) if writer else contextlib.nullcontext() as tmp:
        _write_model_files(processes.broadcast(tmp), cfg, params, tokenizer, about)
    processes.barrier(f"in place {directory}")  # the others may read it from here on


def _write_model_files(directory: str, cfg: TransformerConfig, params, tokenizer, about) -> None:
    import orbax.checkpoint as ocp

    if processes.is_writer():  # the other processes save only their shards of the parameters
        storage.write_atomic(storage.join(directory, "model.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
        storage.write_atomic(storage.join(directory, ABOUT_FILE), json.dumps(about or {}, indent=1))
        if tokenizer is not None:
            if storage.is_remote(directory):  # tokenizers write local files only
                with tempfile.TemporaryDirectory(prefix="cai_jax-tokenizer-") as local:
                    tokenizer.save_pretrained(local)
                    storage.upload_tree(local, storage.join(directory, "tokenizer"))
            else:
                tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    params = layout.to_scan_layout(params, cfg)
    digest = params_digest(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(storage.join(directory, "params"), params)
        ckptr.wait_until_finished()
    processes.barrier(f"saved {directory}")  # every process's shards are there
    if processes.is_writer():
        artifacts.seal_directory(directory, {"params": digest})


def params_digest(params) -> str:
    """sha256 of a parameter pytree's values: every leaf's path, dtype, shape
    and bytes, in the tree's (sorted) order. One leaf at a time on the host."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(processes.to_host(leaf))  # gathered from every process
        h.update(json.dumps([jax.tree_util.keystr(path), str(array.dtype), array.shape]).encode())
        h.update(array.reshape(-1).view(np.uint8))
        del array
    return h.hexdigest()


def read_model_config(directory: str) -> TransformerConfig:
    path = storage.join(directory, "model.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: not a cai_jax model directory")
    with storage.open(path) as f:
        fields = json.load(f)
    fields["heads"] = tuple(fields.get("heads", ("lm",)))
    return TransformerConfig(**fields)


def load_model_dir(directory: str, shardings=None, dtype=None) -> tuple[TransformerConfig, dict]:
    """Config and params (scan layout). `shardings`: optional pytree of
    NamedShardings to restore straight onto a mesh, whatever mesh saved it; each
    process then reads only the chunks its own devices' shards overlap.
    `dtype`: the parameters' dtype after loading (default: as saved)."""
    import orbax.checkpoint as ocp

    directory = storage.abspath(directory)
    cfg = read_model_config(directory)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(storage.join(directory, "params"))
        tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        tree = getattr(tree, "tree", tree)  # the plain dict, to pair with a dict of shardings
        if shardings is None:
            device = jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 alone
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
                m.shape, dtype or m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), tree)
        else:
            target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s),
                                  tree, shardings)
        params = ckptr.restore(storage.join(directory, "params"), target)
    return cfg, params


def read_about(directory: str) -> dict:
    """The model directory's about.json ({} when it has none)."""
    for name in (ABOUT_FILE, _OLD_PM_INFO_FILE):
        path = storage.join(directory, name)
        if storage.exists(path):
            with storage.open(path) as f:
                return json.load(f)
    return {}


def has_tokenizer(directory: str) -> bool:
    return storage.isdir(storage.join(directory, "tokenizer"))


def params_to_numpy(params):
    return jax.tree.map(np.asarray, params)
