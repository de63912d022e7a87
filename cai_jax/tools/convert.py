"""Converts model weights between formats.

    python -m cai_jax.tools.convert --src smollm2 --dst hf:/tmp/smollm2-hf
    python -m cai_jax.tools.convert --src gguf:model.gguf --dst ckpt:/tmp/model
    python -m cai_jax.tools.convert --src hf:DIR --dst ckpt:DIR
    python -m cai_jax.tools.convert --src ckpt:DIR --dst hf:DIR

--src: smollm2 (the bundled SmolLM2-135M-Instruct GGUF), gguf:PATH, hf:DIR, ckpt:DIR.
--dst: hf:DIR (safetensors + config.json + tokenizer, loadable by transformers)
       or ckpt:DIR (cai_jax's own model directory).
"""
import time

from absl import app, flags

from cai_jax.errors import exit_on_user_error
from cai_jax.weights import hf, model_dir
from cai_jax.weights.loader import load_model

_SRC = flags.DEFINE_string("src", None, "smollm2 | gguf:PATH | hf:DIR | ckpt:DIR")
_DST = flags.DEFINE_string("dst", None, "hf:DIR | ckpt:DIR")
_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                           "dtype of the stored parameters (ckpt only; HF export is float32)")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dst = _DST.value
    if not (dst.startswith("hf:") or dst.startswith("ckpt:")):
        raise app.UsageError(f"--dst {dst!r}: expected hf:DIR or ckpt:DIR")
    start = time.time()
    model = load_model(_SRC.value, overrides={"param_dtype": _DTYPE.value}, to_device=False)
    if dst.startswith("hf:"):
        hf.write_hf_dir(dst[3:], model.config, model.params, model.tokenizer)
    else:
        model_dir.save_model_dir(dst[5:], model.config, model.params, model.tokenizer)
    print(f"wrote {dst} ({model.config.num_params() / 1e6:.1f}M parameters, "
          f"{model.config.arch}, {model.config.num_layers} layers) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    # Weights whose config asks for what we do not model: one line, exit 2.
    app.run(lambda argv: exit_on_user_error(main, argv))
