"""Loading weights by shard (weights/views.py, safetensors_files.py, loader.py):
a slice of a parameter read on its own equals that slice of the whole
parameter, and a model loaded onto a mesh, in one process or two, equals the
model loaded whole."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cai_jax.models.config import TransformerConfig
from cai_jax.models.transformer import init_params
from cai_jax.weights import hf, layout, model_dir, safetensors_files
from cai_jax.weights.loader import load_model
from test_multihost import _free_port, _wait

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "shard_loading.py")
SMALL = dict(vocab_size=97, d_model=64, num_layers=3, num_heads=4, head_dim=16, mlp_dim=96, max_seq_len=64)
CONFIGS = {  # every layout change HF import makes: GQA, biases, an untied head, GPT-2's Conv1D
    "llama_gqa_bias_untied": TransformerConfig(arch="llama", num_kv_heads=2, qkv_bias=True, tie_embeddings=False,
                                               **SMALL),
    "gpt2": TransformerConfig(arch="gpt2", num_kv_heads=4, qkv_bias=True, out_bias=True, mlp_bias=True, **SMALL),
}


def _random_params(cfg, seed=0):
    """Init leaves norms at 1 and biases at 0; random values make any misplaced slice show."""
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)


def _random_boxes(shape, rng, count):
    for _ in range(count):
        box = []
        for n in shape:
            a = int(rng.integers(0, n))
            box.append((a, int(rng.integers(a + 1, n + 1))))
        yield tuple(box)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_slice_read_on_its_own_equals_that_slice_of_the_whole(name, tmp_path):
    cfg = CONFIGS[name]
    params = _random_params(cfg)
    hf.write_hf_dir(str(tmp_path / "hf"), cfg, params)
    _, files = hf.read_hf_dir(str(tmp_path / "hf"))
    tree = layout.views_from_hf(files, cfg)
    rng = np.random.default_rng(1)
    for (path, view), original in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params)):
        whole = view.read_all()
        np.testing.assert_array_equal(whole, original, err_msg=jax.tree_util.keystr(path))  # export, import
        for box in _random_boxes(view.shape, rng, 20):
            np.testing.assert_array_equal(view.read(box), whole[tuple(slice(a, b) for a, b in box)],
                                          err_msg=f"{jax.tree_util.keystr(path)} {box}")


def test_the_views_read_arrays_in_memory_as_they_read_files(tmp_path):
    """A mapping of arrays (how tests and GGUF hand tensors over) converts like the files."""
    cfg = CONFIGS["llama_gqa_bias_untied"]
    params = _random_params(cfg, seed=2)
    tensors = layout.to_hf(params, cfg)
    for a, b in zip(jax.tree.leaves(layout.from_hf(tensors, cfg)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_safetensors_slices_cross_chunks_and_read_bfloat16(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    rng = np.random.default_rng(3)
    arrays = {"matrix": rng.normal(size=(37, 11)).astype(np.float32),
              "cube": rng.normal(size=(5, 6, 7)).astype(np.float32),
              "vector": rng.normal(size=(29,)).astype(np.float32)}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tensors["half"] = torch.from_numpy(arrays["matrix"]).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(safetensors_files, "_CHUNK_BYTES", 100)  # a few rows per read
    files = safetensors_files.open_directory(str(tmp_path))
    expected = dict(arrays, half=tensors["half"].float().numpy())
    for name, whole in expected.items():
        assert files.shape(name) == whole.shape
        for box in _random_boxes(whole.shape, rng, 10):
            index = tuple(slice(a, b) for a, b in box)
            got = files.read(name, index)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, whole[index], err_msg=f"{name} {box}")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model (SmolLM2's tokenizer, q/k/v biases, an untied head, random
    values) saved as an HF directory and as our model directory."""
    directory = tmp_path_factory.mktemp("shard_loading")
    model = load_model("init:tiny", {"qkv_bias": True, "tie_embeddings": False}, to_device=False)
    params = _random_params(model.config, seed=4)
    hf.write_hf_dir(str(directory / "hf"), model.config, params, model.tokenizer)
    model_dir.save_model_dir(str(directory / "ckpt"), model.config, params, model.tokenizer)
    return directory


def test_loading_onto_8_devices_equals_loading_whole(saved_model):
    out = subprocess.run([sys.executable, SCRIPT, f"--dir={saved_model}", "--mode=single"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 2 * (2 * 3 + 1), sorted(report)
    for case, result in report.items():
        assert result in (True, {"equal": True, "on_param_shardings": True}), (case, result)


def test_two_processes_each_read_their_half(saved_model):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, SCRIPT, f"--dir={saved_model}", "--mode=multi", f"--process_id={i}",
                               f"--port={port}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outputs = [_wait(proc, f"process {i}") for i, proc in enumerate(procs)]
    for output in outputs:
        report = json.loads(output.strip().splitlines()[-1])
        for kind in ("hf", "ckpt"):
            assert report[kind]["equal"] and report[kind]["on_param_shardings"], (kind, report)
        # Each process read its half of the split parameters and all of the replicated ones.
        assert report["hf"]["elements_read"] == report["hf"]["half_plus_replicated"], report
        # pm_train starts from a model read the same way, not whole on each host.
        pm = report["pm_init"]
        assert pm["equal"] and pm["on_param_shardings"], pm
        assert pm["elements_read"] == pm["half_plus_replicated"], pm
