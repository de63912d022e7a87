"""The preference model (stage `pm_train`) and the scorer PPO and evaluation use.

A preference model (PM) is the trunk of a language model with a scalar head;
its score for an answer is the head's output at the answer's last token, the
tokens laid out as the sampler returns them (with the chat template, a
finished answer ends in its end-of-turn token), so that PPO, which reads the
PM on sampled rows, sees what the PM was trained on. It is trained on pairs
with the soft Bradley-Terry loss (bt_loss.py):

    p(A preferred) = sigmoid(score(A) - score(B)),   target p = AI label p_a

The training mix, as in the paper: harmlessness comparisons labelled by the
feedback model (`labels.jsonl`, whose records carry their pairs), plus helpfulness
comparisons, AI-labelled by default or human-labelled HH-format pairs when
`pm_train.helpful_pairs_path` is set. Optional preference-model pretraining
(PMP) first trains on any HH-format file with hard labels.

Rows are right-padded; the score is gathered at each row's last real token.
Training batches are padded to `batched_forward.training_width` (at least
min_bucket tokens, doubled), scored rows to its `padded_width`, so few shapes
compile. A held-out slice (by hash of the pair id) is scored every
`eval_every` steps (loss, accuracy, calibration gap). The result is a ckpt: directory `<workdir>/models/pm`
(heads=("scalar",)) whose about.json records how answers were rendered, so
`inference.preference_scorer.PreferenceScorer` reads them back the same way.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cai_jax import artifacts, processes, sharding as shd
from cai_jax.errors import UserError
from cai_jax.inference.batched_forward import batched_forward, training_width
from cai_jax.config import optimizer_section
from cai_jax.data.conversation import as_conversation
from cai_jax.data.hh_rlhf import read_pairs
from cai_jax.data.loaders import make_dataset, split_heldout
from cai_jax.models.transformer import Transformer
from cai_jax.model_ref import resolve
from cai_jax.inference.preference_scorer import SCALAR_HEAD, make_score_fn, preference_row
from cai_jax.rl_cai.pairs import prompt_key
from cai_jax.rl_cai.bt_loss import preference_accuracy, soft_bt_loss
from cai_jax.training.metrics import MetricWriter
from cai_jax.training.trainer import Trainer, eval_hook
from cai_jax.weights.loader import LoadedModel
from cai_jax.weights.model_dir import save_model_dir
from cai_jax.weights.tokenizer import pad_token_id

def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Initial weights: "base" (config.model), "sl_cai" (<workdir>/models/sl_cai)
        # or any load_model source; the LM head is replaced by a zero scalar head.
        "init_source": "base",
        # Helpfulness comparisons: "" keeps the AI-labelled helpful pairs of
        # labels.jsonl; a path to an HH-format file (.jsonl/.jsonl.gz, chosen/
        # rejected) uses those human labels instead. helpful_limit: 0 = all.
        "helpful_pairs_path": "",
        "helpful_limit": 0,
        # Preference-model pretraining on an HH-format file before the main
        # phase ("" = off). pmp_steps 0 = one pass over pmp_limit pairs.
        "pmp_path": "",
        "pmp_limit": 1000,
        "pmp_steps": 0,
        # Share of the labelled prompts (picked by a hash of the prompt) whose
        # pairs train a second PM, models/pm_judge, instead of models/pm. PPO
        # maximises models/pm and never sees the judge PM, so evaluation can
        # judge harmlessness with it (eval.harmless_judge="pm_judge"). 0: none.
        "judge_fraction": 0.5,
        # Length of the main phase: num_steps if > 0, else num_epochs passes.
        "num_steps": 0,
        "num_epochs": 1.0,
        "batch_size": 8,
        "grad_accum_steps": 1,
        # Longer rows keep their last max_seq_len tokens (the answer's end).
        "max_seq_len": 512,
        "min_bucket": 64,
        "eval_fraction": 0.1,
        "eval_every": 20,
        "eval_batch_size": 8,
        "save_every": 50,
        "keep_checkpoints": 2,
        # Non-finite steps (loss, gradient or update) skipped, parameters kept,
        # before the stage stops; 0: the first one stops it.
        "max_nonfinite_skips": 0,
        "optimizer": optimizer_section(learning_rate=1e-5, total_steps=0, warmup_steps=5,
                                       schedule="cosine"),
    })


# ------------------------------------------------------------ model functions

def make_pm_loss(model: Transformer):
    """Soft Bradley-Terry loss on a batch of pairs.

    batch: tokens/mask [B, 2, T] (answer A, answer B), p_a [B], weight [B]
    (0 for filler rows). Returns (loss sum, pair count, {"accuracy": correct}).
    """
    score = make_score_fn(model)

    def loss_fn(params, batch, rng):
        del rng
        b, _, t = batch["tokens"].shape
        scores = score(params, batch["tokens"].reshape(2 * b, t), batch["mask"].reshape(2 * b, t))
        r_a, r_b = scores.reshape(b, 2)[:, 0], scores.reshape(b, 2)[:, 1]
        loss_sum, count = soft_bt_loss(r_a, r_b, batch["p_a"], batch["weight"])
        correct, _ = preference_accuracy(r_a, r_b, batch["p_a"], batch["weight"])
        return loss_sum, count, {"accuracy": correct}
    return loss_fn


def pair_batch(examples: Sequence[dict], min_bucket: int, max_len: int, pad_id: int,
               rows: Optional[int] = None) -> dict:
    """Examples {"a": ids, "b": ids, "p_a": float} -> a padded batch for make_pm_loss."""
    rows = rows or len(examples)
    length = training_width(max(max(len(e["a"]), len(e["b"])) for e in examples), min_bucket, max_len)
    tokens = np.full((rows, 2, length), pad_id, np.int32)
    mask = np.zeros((rows, 2, length), np.int32)
    p_a = np.full((rows,), 0.5, np.float32)
    weight = np.zeros((rows,), np.float32)
    for i, e in enumerate(examples):
        for j, key in enumerate(("a", "b")):
            tokens[i, j, :len(e[key])] = e[key]
            mask[i, j, :len(e[key])] = 1
        p_a[i], weight[i] = e["p_a"], 1.0
    return {"tokens": tokens, "mask": mask, "p_a": p_a, "weight": weight}


def batch_shardings(mesh) -> dict:
    return {"tokens": shd.data_sharding(mesh, 3), "mask": shd.data_sharding(mesh, 3),
            "p_a": shd.data_sharding(mesh, 1), "weight": shd.data_sharding(mesh, 1)}


def make_eval_fn(model: Transformer, examples: Sequence[dict], *, batch_size: int, min_bucket: int,
                 max_len: int, pad_id: int, mesh):
    """params -> {"loss", "accuracy", "calibration_gap", "pairs"} over `examples`.

    calibration_gap is the mean |sigmoid(r_a - r_b) - p_a|: how far the PM's
    probabilities are from the soft labels, not just their ordering.
    """
    rows = [e["a"] for e in examples] + [e["b"] for e in examples]
    p_a = np.asarray([e["p_a"] for e in examples], np.float64)
    score = jax.jit(make_score_fn(model))

    def evaluate(params) -> dict:
        # Both answers of batch_size pairs per forward pass, as in training.
        scores = np.asarray(batched_forward(functools.partial(score, params), rows,
                                            batch_size=2 * batch_size, min_width=min_bucket,
                                            max_width=max_len, pad_id=pad_id, mesh=mesh), np.float64)
        return pair_metrics(scores[:len(examples)] - scores[len(examples):], p_a)

    return evaluate


def pair_metrics(diff, p_a) -> dict:
    """Soft BT loss, accuracy (label ties excluded) and calibration gap from
    score differences r_a - r_b and labels p_a, in float64 NumPy."""
    diff, p_a = np.asarray(diff, np.float64), np.asarray(p_a, np.float64)
    log_sig = -np.logaddexp(0.0, -diff)
    log_sig_neg = -np.logaddexp(0.0, diff)
    loss = float(np.mean(-(p_a * log_sig + (1 - p_a) * log_sig_neg)))
    decided = p_a != 0.5
    accuracy = float(np.mean(np.sign(diff[decided]) == np.sign(p_a[decided] - 0.5))) if decided.any() else float("nan")
    gap = float(np.mean(np.abs(1 / (1 + np.exp(-diff)) - p_a)))
    return {"loss": loss, "accuracy": accuracy, "calibration_gap": gap, "pairs": int(diff.size)}


# ------------------------------------------------------------ training data

# Salt of the held-out split (data.loaders.split_heldout) of both training phases.
HELDOUT_SALT = "pm_train-eval"
JUDGE_SALT = "pm_train-judge"


LABEL_FIELDS = ("id", "kind", "conversation", "answer_a", "answer_b", "complete_a", "complete_b", "p_a")


def ai_labelled_pairs(labels_path: str) -> list[dict]:
    """labels.jsonl (the feedback stage's records, which carry their pairs) as
    {id, kind, conversation, a, b, p_a, complete_a, complete_b}."""
    out = []
    for line, label in enumerate(artifacts.read_jsonl(labels_path), 1):
        missing = [k for k in LABEL_FIELDS if k not in label]
        if missing:
            raise ValueError(f"{labels_path} line {line}: no {missing}; rerun the feedback stage")
        p_a = label["p_a"]
        if not isinstance(p_a, (int, float)) or not 0.0 <= p_a <= 1.0:
            raise ValueError(f"{labels_path} line {line}: 'p_a' is {p_a!r}, must be in [0, 1]")
        try:
            conversation = as_conversation(label["conversation"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{labels_path} line {line}: 'conversation' is not a list of turns "
                             f"({e!r})") from None
        # An answer cut at max_new_tokens has no end-of-turn token (as in PPO).
        out.append({"id": str(label["id"]), "kind": label["kind"], "conversation": conversation,
                    "a": label["answer_a"], "b": label["answer_b"], "p_a": float(p_a),
                    "complete_a": bool(label["complete_a"]), "complete_b": bool(label["complete_b"])})
    return out


def human_pairs(path: str, limit: int, on_error: str, kind: str) -> list[dict]:
    """HH-format pairs with hard labels: the chosen answer is A, p_a = 1."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"pm_train: HH-format pairs file {path} does not exist")
    return [{"id": f"{kind}:{p.source}:{p.line}", "kind": kind, "conversation": p.context,
             "a": p.chosen, "b": p.rejected, "p_a": 1.0}
            for p in read_pairs(path, on_error=on_error, limit=limit or None)]


def tokenize_pairs(pairs: Sequence[dict], tokenizer, style: str, max_len: int) -> tuple[list[dict], int]:
    """Token ids of both answers per pair; also how many rows were cut."""
    out, cut = [], 0
    for p in pairs:
        a, cut_a = preference_row(tokenizer, p["conversation"], p["a"], style, max_len,
                                  p.get("complete_a", True))
        b, cut_b = preference_row(tokenizer, p["conversation"], p["b"], style, max_len,
                                  p.get("complete_b", True))
        cut += cut_a + cut_b
        out.append({"id": p["id"], "a": np.asarray(a, np.int32), "b": np.asarray(b, np.int32),
                    "p_a": float(p["p_a"])})
    return out, cut


# ------------------------------------------------------------ training

def init_pm(config, spec: str, workdir: Optional[str] = None, mesh=None) -> LoadedModel:
    """The PM's starting point with a scalar head (zero-initialised when the
    reference is a language model). Given the run's `mesh`, the parameters
    are read by shard straight onto it (each process only its devices'
    slices), never whole on one host."""
    return resolve(spec, config, workdir).load(SCALAR_HEAD, seed=config.seed, mesh=mesh)


class PairIterator:
    """Wraps a grain iterator of pair examples into padded, bucketed batches
    (keeping its get_state/set_state, so the training loop can resume it)."""

    def __init__(self, iterator, to_batch):
        self._it, self._to_batch = iterator, to_batch

    def __next__(self):
        return self._to_batch(next(self._it))

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def build_trainer(model_config, section, mesh, num_steps: Optional[int] = None,
                  checkpoint_dir: Optional[str] = None, optimizer_cfg=None) -> Trainer:
    """The PM trainer of a `pm_train` section (optimizer: its own unless given):
    the stage runs it, tools.aot compiles its step. Batches are `pair_batch`'s."""
    return Trainer(model_config, make_pm_loss, optimizer_cfg or section.optimizer, mesh,
                   batch_sharding=batch_shardings(mesh), num_steps=num_steps,
                   grad_accum_steps=section.grad_accum_steps, checkpoint_dir=checkpoint_dir,
                   keep_checkpoints=section.keep_checkpoints,
                   max_nonfinite_skips=section.max_nonfinite_skips)


def train_phase(*, name: str, model_config, params, train: Sequence[dict], held_out: Sequence[dict],
                num_steps: int, section, optimizer_cfg, mesh, directory: str, seed: int,
                pad_id: int, max_len: Optional[int] = None, progress: bool = True):
    """Trains the PM on tokenized pairs (rows of at most max_len tokens) for
    num_steps; resumes from `directory`/ckpt. Returns (params, last eval metrics)."""
    max_len = max_len or section.max_seq_len
    trainer = build_trainer(model_config, section, mesh, num_steps, os.path.join(directory, "ckpt"),
                            optimizer_cfg)
    writer = MetricWriter(directory, tensorboard=False)
    start = trainer.start(lambda: params, jax.random.key(seed), writer)

    def collate(examples):
        return pair_batch(examples, section.min_bucket, max_len, pad_id)

    dataset = make_dataset(list(train), lambda e: e, batch_size=section.batch_size, seed=seed,
                           batch_fn=list)
    eval_fn = None
    if held_out:
        eval_fn = make_eval_fn(trainer.model, held_out, batch_size=section.eval_batch_size,
                               min_bucket=section.min_bucket, max_len=max_len, pad_id=pad_id,
                               mesh=mesh)
    state, _ = trainer.train(start, PairIterator(iter(dataset), collate), num_steps=num_steps,
                             writer=writer, hooks=[eval_hook(eval_fn, section.eval_every)] if eval_fn else [],
                             save_every=section.save_every, desc=name, progress=progress)
    writer.close()
    trainer.close()
    metrics = eval_fn(state.params) if eval_fn is not None else {}
    return state.params, metrics


def _steps(explicit: int, epochs: float, num_examples: int, batch_size: int) -> int:
    if explicit > 0:
        return explicit
    return max(1, math.ceil(epochs * num_examples / batch_size))


def training_pairs(config, workdir: str) -> list[dict]:
    """The main phase's mix: AI-labelled harmlessness pairs, plus helpfulness
    pairs (AI-labelled, or human-labelled from pm_train.helpful_pairs_path)."""
    section = config.pm_train
    ai = ai_labelled_pairs(os.path.join(workdir, "labels.jsonl"))
    harmless = [p for p in ai if p["kind"] == "harmless"]
    if section.helpful_pairs_path:
        helpful = human_pairs(section.helpful_pairs_path, section.helpful_limit,
                              config.data.get("on_error", "raise"), "helpful_human")
    else:
        helpful = [p for p in ai if p["kind"] == "helpful"]
        if section.helpful_limit:
            helpful = helpful[:section.helpful_limit]
    return harmless + helpful


def run_stage(ctx) -> dict:
    config = ctx.config
    section = config.pm_train
    style = config.data.render
    loaded = init_pm(config, section.init_source, ctx.workdir, mesh=ctx.mesh)
    tokenizer, cfg = loaded.tokenizer, loaded.config
    if tokenizer is None:
        raise ValueError(f"pm_train.init_source {section.init_source!r} has no tokenizer")
    pad_id = pad_token_id(tokenizer)
    max_len = min(section.max_seq_len, cfg.max_seq_len)
    mesh = ctx.mesh
    params = loaded.params
    summary = {}

    if section.pmp_path:
        pmp, cut = tokenize_pairs(human_pairs(section.pmp_path, section.pmp_limit,
                                              config.data.get("on_error", "raise"), "pmp"),
                                  tokenizer, style, max_len)
        pmp_train, pmp_eval = split_heldout(pmp, section.eval_fraction, salt=HELDOUT_SALT)
        steps = _steps(section.pmp_steps, 1.0, len(pmp_train), section.batch_size)
        params, metrics = train_phase(
            name="pmp", model_config=cfg, params=params, train=pmp_train, held_out=pmp_eval,
            num_steps=steps, section=section, optimizer_cfg=section.optimizer.to_dict(), mesh=mesh,
            directory=ctx.path("pm_train", "pmp"), seed=config.seed, pad_id=pad_id, max_len=max_len,
            progress=ctx.progress)
        summary.update({"pmp_pairs": len(pmp_train), "pmp_steps": steps, "pmp_rows_cut": cut})
        summary.update({f"pmp_eval_{k}": v for k, v in metrics.items()})

    examples, cut = tokenize_pairs(training_pairs(config, ctx.workdir), tokenizer, style, max_len)
    if not examples:
        raise ValueError(f"{ctx.path('labels.jsonl')} holds no usable pairs; run the pairs and feedback stages")
    summary["rows_cut"] = cut
    # The reward PM and the judge PM learn from the pairs of disjoint prompts.
    reward_pairs, judge_pairs = split_heldout(examples, section.judge_fraction, salt=JUDGE_SALT,
                                              group=prompt_key)
    if section.judge_fraction and not judge_pairs:
        raise UserError(f"pm_train.judge_fraction is {section.judge_fraction} but {ctx.path('labels.jsonl')} "
                        "holds the pairs of one prompt, which cannot train two PMs on disjoint prompts; "
                        "make pairs of more prompts or set pm_train.judge_fraction=0")
    if processes.is_writer():
        artifacts.write_json_atomic(ctx.path("pm_train", "prompts.json"), {
            "pm": sorted({prompt_key(e["id"]) for e in reward_pairs}),
            "pm_judge": sorted({prompt_key(e["id"]) for e in judge_pairs})})
    phases = [("pm", "main", "models/pm", reward_pairs, params, config.seed + 1, "")]
    if judge_pairs:
        # Both PMs start from the same weights; training the first donates
        # them, so the judge starts from a host copy taken now.
        phases.append(("pm_judge", "judge", "models/pm_judge", judge_pairs, processes.tree_to_host(params),
                       config.seed + 2, "judge_"))
    for name, scratch, out, pairs, start_params, seed, prefix in phases:
        # Pairs made from one prompt stay on one side of the split.
        train, held_out = split_heldout(pairs, section.eval_fraction, salt=HELDOUT_SALT, group=prompt_key)
        steps = _steps(section.num_steps, section.num_epochs, len(train), section.batch_size)
        trained, metrics = train_phase(
            name=name, model_config=cfg, params=start_params, train=train, held_out=held_out,
            num_steps=steps, section=section, optimizer_cfg=section.optimizer.to_dict(), mesh=mesh,
            directory=ctx.path("pm_train", scratch), seed=seed, pad_id=pad_id, max_len=max_len,
            progress=ctx.progress)
        save_model_dir(ctx.path(out), cfg, processes.tree_to_host(trained), tokenizer,
                       about={"render": style, "max_seq_len": max_len, "made_from": section.init_source,
                              "stage": "pm_train", "trained_on": f"{len(train)} pairs of "
                              f"{len({prompt_key(e['id']) for e in train})} prompts"})
        del trained
        summary.update({f"{prefix}train_pairs": len(train), f"{prefix}eval_pairs": len(held_out),
                        f"{prefix}steps": steps})
        summary.update({f"{prefix}eval_{k}": v for k, v in metrics.items()})
    return summary
