"""batched_forward against a plain loop over unpadded rows: input order, no
padding in the results, partial batches, one row, few compiled shapes, and a
mesh of four CPU devices (in a subprocess: the device count is fixed when JAX
starts)."""
import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.inference.batched_forward import batched_forward, padded_width, rows_per_batch

TRACES = collections.Counter()


@jax.jit
def toy_forward(tokens_bt, mask_bt, weight_bt):
    """Per row: the weighted sum of its real tokens, its length, and per token
    the token times its position among the real tokens."""
    TRACES[tokens_bt.shape] += 1
    mask = mask_bt.astype(jnp.int32)
    position_bt = jnp.cumsum(mask, axis=-1) - 1
    return {"weighted_sum": (tokens_bt * weight_bt * mask).sum(-1), "length": mask.sum(-1),
            "per_token": tokens_bt * position_bt * mask}


def reference(row, weight):
    row, weight = np.asarray(row), np.asarray(weight)
    return {"weighted_sum": int((row * weight).sum()), "length": len(row),
            "per_token": row * np.arange(len(row))}


def random_rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, 100, n).tolist() for n in lengths]
    weights = [rng.integers(0, 3, n).tolist() for n in lengths]
    return rows, weights


def check(got, rows, weights, left):
    assert len(got) == len(rows)
    for out, row, weight in zip(got, rows, weights):
        want = reference(row, weight)
        assert out["weighted_sum"] == want["weighted_sum"] and out["length"] == want["length"]
        real = out["per_token"][-len(row):] if left else out["per_token"][:len(row)]
        np.testing.assert_array_equal(real, want["per_token"])


@pytest.mark.parametrize("left", [False, True])
def test_matches_a_loop_over_unpadded_rows_in_input_order(left):
    # 11 rows in batches of 4: the last batch is partial; a pad id of 1000
    # would show in every sum it leaked into.
    rows, weights = random_rows([5, 40, 17, 3, 90, 33, 1, 64, 12, 7, 25])
    got = batched_forward(toy_forward, rows, batch_size=4, min_width=8, max_width=128, pad_id=1000,
                          left=left, token_extras=[weights])
    check(got, rows, weights, left)


def test_one_row_and_no_rows():
    rows, weights = random_rows([6])
    got = batched_forward(toy_forward, rows, batch_size=8, min_width=8, token_extras=[weights])
    check(got, rows, weights, left=False)
    assert got[0]["per_token"].shape == (8,)  # one row, padded to the minimum width
    assert batched_forward(toy_forward, [], batch_size=8, min_width=8) == []


def test_every_row_attends_to_something_and_batches_come_longest_first():
    seen = []

    def spy(tokens_bt, mask_bt):
        seen.append((tokens_bt.shape, np.asarray(mask_bt).any(-1).all()))
        return jnp.zeros(tokens_bt.shape[0])

    batched_forward(spy, [[1] * n for n in (3, 20, 9, 50, 2)], batch_size=2, min_width=4)
    assert [shape for shape, _ in seen] == [(2, 64), (2, 12), (2, 4)]
    assert all(nonempty for _, nonempty in seen)  # filler rows hold one real pad token


def test_widths_rows_and_few_compiled_shapes():
    assert [padded_width(n, 16) for n in (1, 16, 17, 24, 25, 33, 49, 97)] == [16, 16, 24, 24, 32, 48, 64, 128]
    assert padded_width(97, 16, 100) == 100
    with pytest.raises(ValueError, match="longer than the limit of 100"):
        padded_width(101, 16, 100)
    # Calls of a batch or more use the batch size; smaller ones the next power
    # of two; always a multiple of the mesh's batch devices.
    assert [rows_per_batch(n, 8, 1) for n in (1, 3, 8, 20)] == [1, 4, 8, 8]
    assert [rows_per_batch(n, 6, 4) for n in (1, 5, 20)] == [4, 8, 8]
    assert rows_per_batch(1, 1, 3) == 3
    # Rows of 1 to 100 tokens: one program per width (16, 24, ..., 128).
    TRACES.clear()
    rows, weights = random_rows(range(1, 101), seed=1)
    check(batched_forward(toy_forward, rows, batch_size=8, min_width=16, token_extras=[weights]),
          rows, weights, left=False)
    assert sorted(TRACES) == [(8, w) for w in (16, 24, 32, 48, 64, 96, 128)]


MESH_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from cai_jax import sharding as shd
from cai_jax.inference.batched_forward import batched_forward

devices_seen = set()

def forward(tokens_bt, mask_bt):
    devices_seen.add(len(tokens_bt.sharding.device_set))
    return row_sums(tokens_bt, mask_bt)

@jax.jit
def row_sums(tokens_bt, mask_bt):
    return (tokens_bt * mask_bt).sum(-1)

rng = np.random.default_rng(0)
rows = [rng.integers(1, 100, n).tolist() for n in (5, 40, 17, 3, 90, 33, 1)]
got = batched_forward(forward, rows, batch_size=3, min_width=8, pad_id=7,
                      mesh=shd.make_mesh({"data": -1}))
print(json.dumps({"sums": [int(s) for s in got], "want": [sum(r) for r in rows],
                  "devices": sorted(devices_seen)}))
"""


def test_rows_split_over_a_mesh_of_four_devices():
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sums"] == report["want"]
    assert report["devices"] == [4]  # batch_size 3 rounded up to 4 rows, one per device
