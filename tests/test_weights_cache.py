"""The converted-weights cache: what it returns equals a fresh conversion bit for
bit, and a changed file, a damaged entry, the off switch or an unwritable folder
each fall back to converting the GGUF again."""
import os

import gguf
import numpy as np
import pytest

from cai_jax.errors import NotModelledError
from cai_jax.models.config import RopeScaling
from cai_jax.weights import converted_cache, gguf_import, layout

D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 96, 128


def _write_tiny_gguf(path, seed: int, extra=None) -> None:
    """A two-layer llama GGUF with Q8_0 matrices, so that loading dequantizes.
    `extra(writer)` adds fields or tensors."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", D), ("block_count", LAYERS), ("feed_forward_length", MLP),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("context_length", 256), ("vocab_size", VOCAB)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)

    def matrix(name, rows, cols):
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        q = gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", VOCAB, D)
    w.add_tensor("output_norm.weight", rng.standard_normal(D).astype(np.float32))
    for i in range(LAYERS):
        for name, rows, cols in (("attn_q", HEADS * HEAD_DIM, D), ("attn_k", KV_HEADS * HEAD_DIM, D),
                                 ("attn_v", KV_HEADS * HEAD_DIM, D), ("attn_output", D, HEADS * HEAD_DIM),
                                 ("ffn_gate", MLP, D), ("ffn_up", MLP, D), ("ffn_down", D, MLP)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(D).astype(np.float32))
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fresh(path):
    """The conversion without any cache: the reference every load must equal."""
    cfg, tensors = gguf_import.read_gguf(str(path))
    return cfg, layout.from_hf(tensors, cfg, source=str(path))


def _assert_identical(a, b):
    fa, fb = converted_cache._flatten(a), converted_cache._flatten(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and fa[name].shape == fb[name].shape, name
        # Bit for bit, NaN included: compare the bytes, not the values.
        assert np.ascontiguousarray(fa[name]).tobytes() == np.ascontiguousarray(fb[name]).tobytes(), name


def _entries(cache):
    root = os.path.join(cache, "weights")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(converted_cache.ENV_SWITCH, raising=False)
    return str(tmp_path / "cache")


def test_cached_load_is_bit_identical_to_a_fresh_conversion(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, seed=0)
    cfg0, fresh = _fresh(path)
    cfg1, first = converted_cache.load_gguf(str(path))  # converts and writes the entry
    assert len(_entries(cache)) == 1  # and no temporary folder left behind
    cfg2, cached = converted_cache.load_gguf(str(path))
    assert cfg0 == cfg1 == cfg2
    assert isinstance(cached["embed"], np.memmap)  # really read back from the entry
    _assert_identical(fresh, first)
    _assert_identical(fresh, cached)


def test_a_changed_file_is_converted_again_and_replaces_its_old_entry(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, seed=0)
    converted_cache.load_gguf(str(path))
    old = _entries(cache)
    _write_tiny_gguf(path, seed=1)  # same size, new weights
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even on a coarse clock
    _, loaded = converted_cache.load_gguf(str(path))
    _assert_identical(_fresh(path)[1], loaded)
    new = _entries(cache)
    assert len(new) == 1 and new != old


def test_a_damaged_entry_is_noticed_and_rebuilt(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, seed=0)
    converted_cache.load_gguf(str(path))
    array_file = os.path.join(cache, "weights", _entries(cache)[0], "layers.mlp.down.kernel.npy")
    with open(array_file, "r+b") as f:  # flip one byte of the data, keeping the file's size
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(RuntimeWarning, match="checksum"):
        _, loaded = converted_cache.load_gguf(str(path))
    _assert_identical(_fresh(path)[1], loaded)
    _, again = converted_cache.load_gguf(str(path))  # the rebuilt entry is whole
    _assert_identical(loaded, again)


def test_the_off_switch_writes_nothing(tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, seed=0)
    monkeypatch.setenv(converted_cache.ENV_SWITCH, "0")
    _, loaded = converted_cache.load_gguf(str(path))
    _assert_identical(_fresh(path)[1], loaded)
    assert not os.path.exists(cache)


def test_an_unwritable_cache_folder_is_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot be made, even by root
    monkeypatch.setenv("CAI_JAX_CACHE", str(blocker / "cache"))
    monkeypatch.delenv(converted_cache.ENV_SWITCH, raising=False)
    with pytest.warns(RuntimeWarning, match="not cached"):
        _, loaded = converted_cache.load_gguf(str(path))
    _assert_identical(_fresh(path)[1], loaded)


def test_a_bad_switch_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(converted_cache.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match=r"\$CAI_JAX_WEIGHTS_CACHE is 'maybe'; use 0"):
        converted_cache.load_gguf("unused.gguf")


def test_smollm2_from_the_cache_equals_its_conversion(cache):
    """The bundled model through load_model: the second load reads the entry the
    first one wrote, and both give the same host parameters."""
    from cai_jax.weights.loader import load_model

    first = load_model("smollm2", to_device=False)
    second = load_model("smollm2", to_device=False)
    assert len(_entries(cache)) == 1 and first.config == second.config
    _assert_identical(first.params, second.params)


def _rope_scaling(kind, factor=4.0):
    def add(w):
        w.add_string("llama.rope.scaling.type", kind)
        w.add_float32("llama.rope.scaling.factor", factor)
    return add


def test_gguf_linear_rope_scaling_is_read(tmp_path, cache):
    path = tmp_path / "linear.gguf"
    _write_tiny_gguf(path, seed=0, extra=_rope_scaling("linear"))
    cfg, _ = converted_cache.load_gguf(str(path))
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)


@pytest.mark.parametrize("extra, feature", [
    (_rope_scaling("yarn"), "rope scaling 'yarn' is not modelled (only linear)"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32)),
     "per-frequency RoPE divisors (tensor rope_freqs"),
    (lambda w: w.add_uint32("llama.attention.sliding_window", 64),
     "sliding-window attention (window 64) is not modelled"),
    (lambda w: w.add_uint32("llama.rope.dimension_count", HEAD_DIM // 2),
     f"RoPE on {HEAD_DIM // 2} of each head's {HEAD_DIM} dimensions (partial rotary) is not modelled"),
])
def test_gguf_features_we_do_not_model_are_refused_in_one_line(tmp_path, cache, extra, feature):
    path = tmp_path / "unmodelled.gguf"
    _write_tiny_gguf(path, seed=0, extra=extra)
    with pytest.raises(NotModelledError) as info:
        converted_cache.load_gguf(str(path))
    assert str(info.value).startswith(f"{path}: {feature}") and "\n" not in str(info.value)
    assert _entries(cache) == []
