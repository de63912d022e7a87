"""SL-CAI finetuning (stage `sl_train`): the helpful model learns the final revisions.

Training examples are (red-team prompt, final revision) from `sl_data.jsonl`
mixed with (helpful prompt, helpful answer) from `helpful_data.jsonl`, so the
model keeps being helpful while it learns to answer harmful requests the way
its revisions did. Each example is the conversation rendered the way the
other stages prompt the model (`data.render`: the tokenizer's chat template
or the paper's HH text); the loss covers only the assistant's answer and the
token that ends it, so the model learns what to say and when to stop, not to
predict the prompt.

A held-out slice of the SL data is scored before training (the base model)
and every `eval_every` steps, which shows how much closer to the revisions the
model got. The trained model is written to `<workdir>/models/sl_cai`.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from cai_jax import artifacts, processes, sharding as shd, storage
from cai_jax.inference.batched_forward import batched_forward, training_width
from cai_jax.config import optimizer_section
from cai_jax.model_ref import resolve
from cai_jax.data.conversation import Turn, encode_answer
from cai_jax.data.loaders import make_dataset, split_heldout
from cai_jax.models.transformer import Transformer
from cai_jax.training import lm_loss
from cai_jax.training.metrics import MetricWriter, read_metrics
from cai_jax.training.trainer import Trainer, eval_hook
from cai_jax.weights.model_dir import save_model_dir
from cai_jax.weights.tokenizer import pad_token_id


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Length of training: num_steps if > 0, else num_epochs passes over the mix.
        "num_steps": 0,
        "num_epochs": 1.0,
        # grad_accum_steps splits each batch into micro-batches (same result):
        # on a CPU host a 135M model's activations and [batch, length, vocab]
        # logits for 8 x 512 tokens take over 10 GB, for 4 x 512 half that.
        "batch_size": 8,
        "grad_accum_steps": 2,
        # Helpful examples per SL-CAI revision example in the training mix
        # (capped by what helpful_data.jsonl holds); 0 trains on revisions only.
        "helpful_ratio": 1.0,
        # Prompts whose revisions were all dropped have final_answer ==
        # initial_answer; training on them would teach the unrevised answer.
        "skip_unrevised": True,
        # Fraction of SL records held out to measure the loss on revisions.
        "eval_fraction": 0.1,
        "eval_every": 20,
        "eval_batch_size": 4,
        # Examples longer than max_seq_len are skipped (and counted). Batches are
        # right-padded to min_bucket tokens doubled until they fit
        # (batched_forward.training_width), so only a few shapes get compiled.
        "max_seq_len": 512,
        "min_bucket": 64,
        # None: the rendering the other stages use (config.data.render).
        "render": config_dict.placeholder(str),
        "save_every": 50,
        "keep_checkpoints": 2,
        # Non-finite steps (loss, gradient or update) skipped, parameters kept,
        # before the stage stops; 0: the first one stops it.
        "max_nonfinite_skips": 0,
        "optimizer": optimizer_section(learning_rate=1e-5, total_steps=0, warmup_steps=5,
                                       schedule="cosine"),
    })


# ------------------------------------------------------------ tokenization

def tokenize_example(conversation: Sequence[Turn], answer: str, tokenizer,
                     style: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `conversation` answered by `answer` (`encode_answer`: as
    the sampler sees them), and the loss mask.

    The mask is 1 exactly on the answer's tokens and the token that ends it
    (`end_of_answer_ids`: the chat template's end-of-turn token, or EOS for
    the HH rendering, whose models otherwise never learn to stop).
    """
    prompt_ids, answer_ids = encode_answer(tokenizer, conversation, answer, style)
    tokens = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(answer_ids), np.int32)])
    return tokens, mask


def pad_batch(examples: Sequence[dict], min_width: int, max_width: int, pad_id: int,
              rows: Optional[int] = None) -> dict:
    """Right-pads examples ({"tokens", "loss_mask"}) to the `training_width` of the
    longest; `rows` adds all-padding rows (masked out everywhere)."""
    length = training_width(max(len(e["tokens"]) for e in examples), min_width, max_width)
    rows = rows or len(examples)
    tokens = np.full((rows, length), pad_id, np.int32)
    attention = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    for i, e in enumerate(examples):
        n = len(e["tokens"])
        tokens[i, :n] = e["tokens"]
        attention[i, :n] = 1
        loss_mask[i, :n] = e["loss_mask"]
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


# ------------------------------------------------------------ training mix

# Salt of the held-out split of the SL records (data.loaders.split_heldout).
HELDOUT_SALT = "sl_train-eval"


def revision_pairs(records: Sequence[dict], skip_unrevised: bool) -> tuple[list[tuple], int]:
    """(conversation, final answer) per SL record, and how many were skipped
    because no revision of theirs was kept."""
    pairs, skipped = [], 0
    for r in records:
        kept = [x for x in r["rounds"] if x.get("dropped") is None]
        if (skip_unrevised and not kept) or not r["final_answer"].strip():
            skipped += 1
            continue
        pairs.append(((Turn("user", r["prompt"]),), r["final_answer"]))
    return pairs, skipped


def helpful_pairs(records: Sequence[dict], count: int, seed: int) -> list[tuple]:
    """(conversation, answer) for a seeded choice of `count` usable helpful records
    (all of them when there are fewer), in file order."""
    usable = [r for r in records if r.get("dropped") is None and r["answer"].strip()]
    order = np.random.default_rng(seed).permutation(len(usable))[:count]
    return [((Turn("user", usable[i]["prompt"]),), usable[i]["answer"]) for i in sorted(order)]


def tokenize_all(pairs, tokenizer, style: str, max_len: int) -> tuple[list[dict], int]:
    """Tokenized examples and the number skipped for being longer than max_len."""
    out, too_long = [], 0
    for conv, answer in pairs:
        tokens, mask = tokenize_example(conv, answer, tokenizer, style)
        if len(tokens) > max_len:
            too_long += 1
            continue
        out.append({"tokens": tokens, "loss_mask": mask})
    return out, too_long


# ------------------------------------------------------------ evaluation

def make_eval_fn(model: Transformer, examples: Sequence[dict], *, min_width: int, max_width: int,
                 pad_id: int, batch_size: int, mesh):
    """params -> {"loss", "tokens"}: mean loss per answer token over `examples`."""
    rows = [e["tokens"] for e in examples]
    loss_masks = [e["loss_mask"] for e in examples]

    @jax.jit
    def row_loss_sums(params, tokens_bt, mask_bt, loss_mask_bt):
        """(summed loss, answer tokens) per row: the training loss, kept per row."""
        with nn.logical_axis_rules(shd.DEFAULT_RULES):
            logp = lm_loss.token_logprobs(model, params, tokens_bt, mask_bt)
        weight = loss_mask_bt[:, 1:].astype(jnp.float32)
        return -(logp * weight).sum(-1), weight.sum(-1)

    def evaluate(params) -> dict:
        per_row = batched_forward(functools.partial(row_loss_sums, params), rows, batch_size=batch_size,
                                  min_width=min_width, max_width=max_width, pad_id=pad_id,
                                  token_extras=[loss_masks], mesh=mesh)
        total = float(np.sum([loss for loss, _ in per_row], dtype=np.float64))
        count = float(np.sum([tokens for _, tokens in per_row], dtype=np.float64))
        return {"loss": total / max(count, 1.0), "tokens": count}

    return evaluate


# ------------------------------------------------------------ the stage

def build_trainer(model_config, section, mesh, num_steps: Optional[int] = None,
                  checkpoint_dir: Optional[str] = None) -> Trainer:
    """The SFT trainer of a `sl_train` section: the stage runs it, tools.aot
    compiles its step. Batches are `pad_batch`'s, split over the batch axes."""
    return Trainer(model_config, lm_loss.make_lm_loss, section.optimizer, mesh,
                   batch_sharding=shd.data_sharding(mesh, 2), num_steps=num_steps,
                   grad_accum_steps=section.grad_accum_steps, checkpoint_dir=checkpoint_dir,
                   keep_checkpoints=section.keep_checkpoints,
                   max_nonfinite_skips=section.max_nonfinite_skips)


def _logged_step0_eval(path: str) -> dict:
    """The base model's held-out numbers as the first run logged them (step 0)."""
    rows = read_metrics(path) if storage.exists(path) else []
    return next(({k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_")}
                 for r in rows if r.get("step") == 0), {})


def run_stage(ctx) -> dict:
    config, section = ctx.config, ctx.config.sl_train
    style = section.render or config.data.render
    sl_path, helpful_path = ctx.path("sl_data.jsonl"), ctx.path("helpful_data.jsonl")
    sl_records = artifacts.read_jsonl(sl_path)
    helpful_records = artifacts.read_jsonl(helpful_path)

    base = resolve("base", config)
    # Read by shard onto the run's mesh (each process only its devices'
    # slices); the trainer's placed copy starts from these.
    loaded = base.load(seed=config.seed, mesh=ctx.mesh, to_device=ctx.mesh is not None)
    cfg, tokenizer = loaded.config, loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"model source {base.source!r} has no tokenizer; sl_train needs one to render "
                         "the training conversations")
    pad_id = pad_token_id(tokenizer)
    max_len = min(section.max_seq_len, cfg.max_seq_len)

    train_records, eval_records = split_heldout(sl_records, section.eval_fraction, salt=HELDOUT_SALT)
    revisions, skipped_train = revision_pairs(train_records, section.skip_unrevised)
    eval_revisions, skipped_eval = revision_pairs(eval_records, section.skip_unrevised)
    helpful = helpful_pairs(helpful_records, round(section.helpful_ratio * len(revisions)), config.seed)
    train_examples, too_long = tokenize_all(revisions + helpful, tokenizer, style, max_len)
    eval_examples, eval_too_long = tokenize_all(eval_revisions, tokenizer, style, max_len)
    if not train_examples:
        raise ValueError(f"{sl_path} and {helpful_path} give no training examples "
                         f"({skipped_train} SL records had no kept revision, {too_long} were longer "
                         f"than sl_train.max_seq_len={max_len}); generate more data or raise the limit")
    num_steps = section.num_steps or max(
        1, math.ceil(section.num_epochs * len(train_examples) / section.batch_size))

    mesh = ctx.mesh
    out_dir = ctx.path("sl_train")
    trainer = build_trainer(cfg, section, mesh, num_steps, os.path.join(out_dir, "checkpoints"))
    writer = MetricWriter(out_dir, "metrics")
    start = trainer.start(lambda: loaded.params, jax.random.key(config.seed), writer)
    evaluate = None
    base_eval = {}
    if eval_examples:
        evaluate = make_eval_fn(trainer.model, eval_examples, min_width=section.min_bucket,
                                max_width=max_len, pad_id=pad_id, batch_size=section.eval_batch_size,
                                mesh=mesh)
        if start.resumed:
            base_eval = _logged_step0_eval(writer.path)
        else:  # before any step: the improvement is measured from here
            base_eval = evaluate(start.state.params)
            writer.write(0, {f"eval_{k}": v for k, v in base_eval.items()})
    dataset = make_dataset(train_examples, lambda e: e, batch_size=section.batch_size, seed=config.seed,
                           batch_fn=lambda rows: pad_batch(rows, section.min_bucket, max_len, pad_id))
    state, last = trainer.train(
        start, iter(dataset), num_steps=num_steps, writer=writer,
        hooks=[eval_hook(evaluate, section.eval_every)] if evaluate else [],
        save_every=section.save_every, desc="sl_train", progress=ctx.progress)
    writer.close()
    trainer.close()
    final_eval = evaluate(state.params) if evaluate else {}
    save_model_dir(ctx.path("models", "sl_cai"), cfg, state.params, tokenizer,
                   about={"render": style, "made_from": base.source, "stage": "sl_train"})

    summary = {
        "steps": num_steps,
        "train_examples": len(train_examples),
        "revision_examples": len(revisions),
        "helpful_examples": len(helpful),
        "eval_examples": len(eval_examples),
        "skipped_unrevised": skipped_train + skipped_eval,
        "skipped_too_long": too_long + eval_too_long,
        "final_train_loss": float(last["loss"]) if "loss" in last else None,
        "base_eval_loss": base_eval.get("loss"),
        "sl_cai_eval_loss": final_eval.get("loss"),
    }
    if processes.is_writer():
        artifacts.write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
