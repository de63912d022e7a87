"""Evaluation (stage `eval`): judged comparisons, Elo with intervals, the report.

1. Answers. Every model under evaluation answers held-out prompts (the test
   split of the embedded red-team and helpful sets) through the shared
   sampler: the helpful model (`config.model`, "base"), SL-CAI
   (`models/sl_cai`), each PPO checkpoint the ppo stage recorded in
   `models/rl_cai/checkpoints.json`, and the checkpoints recorded by other RL
   runs named in `eval.extra_rl_runs` (e.g. the chain-of-thought-feedback
   variant). Answers go to `eval/answers.jsonl`,
   keyed by model and prompt; a record is reused while the model's files and
   the sampling settings are unchanged, so a killed stage resumes and a new
   PPO checkpoint only adds its own answers.
2. Judgments. On every prompt, every pair of models is judged: red-team
   prompts by the harmlessness judge, helpful prompts by the helpfulness
   judge (judges.py; each sees the answers in both orders). Records go to
   `eval/judgments.jsonl`, reused while the judge and both answers are unchanged.
3. Elo per judge (elo.fit_elo), anchored at the base model = 0, with
   bootstrap intervals over prompts: `eval/elo.json`.
4. Figure 5: the preference model scores the initial answer and each revision
   in `sl_data.jsonl` (`eval/revision_scores.jsonl`), when both exist.
5. `report.md` (report.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cai_jax import artifacts, pipeline, processes, storage
from cai_jax.constitution import constitution_from_config
from cai_jax.data.conversation import Turn, answer_stop_strings, build_initial_prompt
from cai_jax.data.prompt_sets import Prompt, load_prompts
from cai_jax.eval import judges as judges_lib
from cai_jax.eval import report
from cai_jax.eval.elo import fit_elo
from cai_jax.model_ref import CHECKPOINTS_FILE, directory_version, resolve, rl_checkpoints

if TYPE_CHECKING:
    from jax.sharding import Mesh

# Judge dimension -> the prompts it is judged on. "harmless_reward_pm" is the
# harmlessness column of the PM that PPO maximised (eval.reward_pm_judge).
DIMENSIONS = {"harmless": "red_team", "helpful": "helpful", "harmless_reward_pm": "red_team"}
BASE = "base"
JUDGE_CHUNK = 64  # comparisons judged between two saves of judgments.jsonl


def get_default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Models that answer: "base" (config.model), "sl_cai" (models/sl_cai) and
        # "rl_cai" (the checkpoints in models/rl_cai/checkpoints.json), comma-separated.
        "models": "base,sl_cai,rl_cai",
        # "all" PPO checkpoints (the figure-2 curve) or only the "last".
        "rl_checkpoints": "all",
        # More RL runs, e.g. chain-of-thought feedback: "NAME=DIR[,NAME=DIR]", DIR a
        # run's work directory or its models/rl_cai (either way, the checkpoints
        # listed in models/rl_cai/checkpoints.json).
        "extra_rl_runs": "",
        # Held-out prompts per kind (test split of the embedded sets; 0 = all).
        "red_team_limit": 64,
        "helpful_limit": 64,
        "sampling": ml_collections.ConfigDict({
            "temperature": 1.0, "top_k": 0, "top_p": 0.95, "max_new_tokens": 128, "batch_size": 16}),
        # Judges (judges.py): "pm" (the preference model PPO maximised),
        # "pm_judge" (the run's second PM, trained on other prompts' labels:
        # pm_train.judge_fraction), "pm:DIR", "feedback:harmless" /
        # "feedback:helpful" (the AI labeler with that principle set),
        # "human:PATH" (labelled pairs) or "none". The harmlessness judge is
        # one PPO never saw, so RL-CAI's Elo is not its own reward.
        "harmless_judge": "pm_judge",
        "helpful_judge": "feedback:helpful",
        # A second harmlessness column by the PM PPO was trained against. It is
        # not an independent judge (it measures how far PPO pushed its own
        # reward, reward hacking included), so it is reported beside
        # harmless_judge, labelled, never instead. "none", or the same spec as
        # harmless_judge, leaves the column out.
        "reward_pm_judge": "pm",
        # The AI labeler when a judge is "feedback:...". Its constitution is set
        # here, not by config.constitution, so ablations over the constitution
        # are all judged by the same principles.
        "feedback_judge": ml_collections.ConfigDict({
            "model_source": "base", "constitution": "default", "num_principles": 4,
            "num_exemplars": -1, "batch_size": 8, "max_seq_len": 1024, "min_bucket": 128}),
        "pm_batch_size": 8,
        "n_bootstrap": 1000,
        "level": 0.95,
        # Figure 5: PM score of the initial answer and each revision in sl_data.jsonl.
        "revision_scores": True,
        "report_prompts": 3,
    })


# ------------------------------------------------------------ models

@dataclasses.dataclass(frozen=True)
class EvalModel:
    """One model under evaluation."""

    name: str  # "base", "sl_cai", "rl_cai/step_K", "<extra>/step_K"
    method: str  # the line it belongs to in figure 2
    step: Optional[int]  # PPO step, None for base and SL-CAI
    source: str  # load_model source
    overrides: tuple = ()  # load_model overrides (base model only), as sorted items
    version: str = ""  # changes when the weights change

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "step": self.step, "source": self.source}


def _parse_extra_runs(text: str) -> list[tuple[str, str]]:
    runs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, directory = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not directory:
            raise ValueError(f"eval.extra_rl_runs entry {item!r}: expected NAME=DIR with NAME made of "
                             "letters, digits, '_', '.', '-'")
        if name == "rl_cai" or name in [n for n, _ in runs]:
            raise ValueError(f"eval.extra_rl_runs: the name {name!r} is taken; give each run its own name")
        runs.append((name, directory))
    return runs


def find_models(config, workdir: str) -> list[EvalModel]:
    """The models to evaluate, in display order: base, SL-CAI, RL checkpoints."""
    section = config.eval
    wanted = [s.strip() for s in section.models.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in (BASE, "sl_cai", "rl_cai")]
    if unknown:
        raise ValueError(f"eval.models has {unknown}; choose from 'base', 'sl_cai', 'rl_cai'")
    if section.rl_checkpoints not in ("all", "last"):
        raise ValueError(f"eval.rl_checkpoints is {section.rl_checkpoints!r}; use 'all' or 'last'")
    models = []
    if BASE in wanted:
        ref = resolve(BASE, config)
        models.append(EvalModel(BASE, "helpful model", None, ref.source, ref.overrides,
                                version=ref.version(config.seed)))
    if "sl_cai" in wanted:
        ref = resolve("sl_cai", config, workdir)
        models.append(EvalModel("sl_cai", "SL-CAI", None, ref.source, version=ref.version(config.seed)))
    runs = [("rl_cai", os.path.join(workdir, "models", "rl_cai"))] if "rl_cai" in wanted else []
    for name, directory in _parse_extra_runs(section.extra_rl_runs):
        nested = os.path.join(directory, "models", "rl_cai")
        runs.append((name, nested if storage.isdir(nested) else directory))
    for name, directory in runs:
        checkpoints = rl_checkpoints(directory)
        if name != "rl_cai" and not checkpoints:
            raise FileNotFoundError(f"eval.extra_rl_runs {name}: {directory}/{CHECKPOINTS_FILE} records no "
                                    "checkpoints; run that run's ppo stage")
        if section.rl_checkpoints == "last":
            checkpoints = checkpoints[-1:]
        method = "RL-CAI" if name == "rl_cai" else f"RL-CAI ({name})"
        models += [EvalModel(f"{name}/step_{step}", method, step, "ckpt:" + path,
                             version=directory_version(path)) for step, path in checkpoints]
    if len(models) < 2:
        raise ValueError(f"eval needs at least two models to compare; found {[m.name for m in models]} "
                         f"(eval.models = {section.models!r})")
    return models


def eval_prompts(data, section) -> dict[str, list[Prompt]]:
    """Held-out prompts per kind: the test split of config.data's sources, cut
    to the eval section's limits."""
    return {kind: load_prompts(data, kind, "test", limit=section[f"{kind}_limit"])
            for kind in ("red_team", "helpful")}


# ------------------------------------------------------------ answers

def _reopen(path: str, key: str = "id"):
    """A record log (processes.open_records) that starts from the finished file
    of an earlier run, so its records can be reused when new models or prompts
    are added."""
    if processes.is_writer() and storage.exists(path) and not storage.exists(path + ".partial"):
        artifacts.write_jsonl_atomic(path + ".partial", artifacts.read_jsonl(path))
    return processes.open_records(path, key=key)


def answer_key(model: str, prompt_id: str) -> str:
    return f"{model}|{prompt_id}"


def _tokenizer_fingerprint(tokenizer) -> str:
    """Equal for tokenizers that encode, decode and template alike."""
    return artifacts.fingerprint({"vocab": sorted(tokenizer.get_vocab().items()),
                                  "template": tokenizer.chat_template,
                                  "special": tokenizer.special_tokens_map})


def make_answer_fn(model: EvalModel, sampling, render: str, seed: int, mesh,
                   samplers: Optional[dict] = None, shared_prefix: bool = False) -> Callable:
    """Loads the model; returns prompts -> list of (answer, finish_reason, n_tokens).

    `samplers` caches Sampler objects by model shape and tokenizer: SL-CAI and
    the RL checkpoints share the base model's shapes, so they share its
    compiled prefill/decode functions instead of compiling their own.
    """
    from cai_jax.inference.sampling import Sampler, SamplingParams
    from cai_jax.sl_cai.cleanup import clean_text
    from cai_jax.weights.loader import load_model
    from cai_jax.weights.tokenizer import encode_text

    loaded = load_model(model.source, dict(model.overrides), seed=seed, mesh=mesh)
    if loaded.tokenizer is None:
        raise ValueError(f"eval model {model.name} ({model.source}) has no tokenizer")
    tokenizer = loaded.tokenizer
    samplers = {} if samplers is None else samplers
    key = (loaded.config, _tokenizer_fingerprint(tokenizer))
    if key not in samplers:
        samplers[key] = Sampler(loaded.config, tokenizer, mesh=mesh, progress=False,
                                shared_prefix=shared_prefix)
    sampler = samplers[key]
    stops = answer_stop_strings(render)
    params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                            stop_strings=stops)
    budget = loaded.config.max_seq_len - sampling.max_new_tokens

    def answer(prompts: Sequence[Prompt]) -> list[tuple[str, str, int]]:
        ids = []
        for p in prompts:
            text = build_initial_prompt(p.conversation(), style=render, tokenizer=tokenizer)
            row = encode_text(tokenizer, text)
            if len(row) > budget:
                raise ValueError(f"eval prompt {p.id} has {len(row)} tokens; with "
                                 f"eval.sampling.max_new_tokens={sampling.max_new_tokens} it does not "
                                 f"fit {model.name}'s context of {loaded.config.max_seq_len}")
            ids.append(row)
        # Per-prompt example ids: an answer depends on (seed, prompt), not on batching.
        samples = sampler.generate(loaded.params, ids, params, seed=seed,
                                   example_ids=[p.id for p in prompts], batch_size=sampling.batch_size)
        return [(clean_text(s.text, stops), s.finish_reason, len(s.tokens)) for s in samples]

    return answer


def collect_answers(models: Sequence[EvalModel], prompts: Sequence[Prompt], path: str, *,
                    sampling, render: str, seed: int, mesh: Mesh, progress: bool = True,
                    answer_fn_factory: Optional[Callable] = None,
                    shared_prefix: bool = False) -> dict[tuple[str, str], dict]:
    """Answers of every model to every prompt, from the cache or the sampler.

    Returns {(model name, prompt id): record}. A cached record counts only if
    its stamp (model version, sampling settings, render style, seed, prompt
    text) matches; otherwise it is answered again. `shared_prefix` (the
    sampler's, a speed switch) is not part of the stamp.
    """
    answer_fn_factory = answer_fn_factory or make_answer_fn
    # A prompt listed twice (two dimensions judging the same prompts, such as
    # the reward-PM column) is answered and recorded once.
    prompts = list({p.id: p for p in prompts}.values())
    log = _reopen(path)
    plain = sampling.to_dict() if hasattr(sampling, "to_dict") else dict(sampling)
    settings = {"sampling": plain, "render": render, "seed": seed}
    stamps = {(m.name, p.id): artifacts.fingerprint({"model": m.version, "prompt": p.text, **settings})
              for m in models for p in prompts}
    cached = {r["id"]: r for r in log.records}
    samplers: dict = {}
    bar = tqdm(total=len(models) * len(prompts), desc="eval answers", disable=not progress,
               dynamic_ncols=True)
    for model in models:
        todo = [p for p in prompts
                if cached.get(answer_key(model.name, p.id), {}).get("stamp") != stamps[(model.name, p.id)]]
        bar.update(len(prompts) - len(todo))
        if not todo:
            continue
        answer = answer_fn_factory(model, sampling, render, seed, mesh, samplers, shared_prefix=shared_prefix)
        for chunk in artifacts.iter_batches(todo, max(1, sampling.batch_size)):
            records = [{"id": answer_key(model.name, p.id), "model": model.name, "prompt_id": p.id,
                        "kind": p.kind, "category": p.category, "prompt": p.text, "answer": text,
                        "finish_reason": reason, "answer_tokens": n,
                        "stamp": stamps[(model.name, p.id)]}
                       for p, (text, reason, n) in zip(chunk, answer(chunk))]
            log.extend(records)
            cached.update({r["id"]: r for r in records})
            bar.update(len(chunk))
        del answer  # frees the model's parameters before the next one loads
    bar.close()
    order = [answer_key(m.name, p.id) for m in models for p in prompts]
    log.finish(order=order)
    return {(m.name, p.id): cached[answer_key(m.name, p.id)] for m in models for p in prompts}


# ------------------------------------------------------------ judges

class JudgeFactory:
    """Builds judges from spec strings on first use and shares them (one PM
    serves both dimensions and figure 5)."""

    def __init__(self, config, workdir: str, mesh: Mesh):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self._built: dict[str, judges_lib.Judge] = {}

    def pm_dir(self, spec: judges_lib.JudgeSpec) -> str:
        directory = spec.arg or os.path.join(self.workdir, "models", spec.run_model)
        return directory[len("ckpt:"):] if directory.startswith("ckpt:") else directory

    def version(self, spec_text: str) -> str:
        """The judge's version without loading it (cache keys need it up front)."""
        spec = judges_lib.parse_judge_spec(spec_text)
        if spec.kind == "pm":
            return directory_version(self.pm_dir(spec))
        if spec.kind == "human":
            return artifacts.file_hash(spec.arg) or "missing"
        if spec.kind == "feedback":
            section = self.config.eval.feedback_judge.to_dict()
            model = resolve(section["model_source"], self.config, self.workdir).version(self.config.seed)
            return artifacts.fingerprint({"section": section, "model": model, "seed": self.config.seed})
        return ""

    def pm_scorer(self, spec: judges_lib.JudgeSpec):
        from cai_jax.inference.preference_scorer import PreferenceScorer

        directory = self.pm_dir(spec)
        if not storage.exists(os.path.join(directory, "model.json")):
            raise FileNotFoundError(f"eval judge '{spec.arg or spec.run_model}' needs a preference model at "
                                    f"{directory}; run pm_train (pm_judge: with pm_train.judge_fraction > 0) "
                                    "or choose another judge (eval.harmless_judge/helpful_judge)")
        return PreferenceScorer.from_dir(directory, batch_size=self.config.eval.pm_batch_size,
                                         mesh=self.mesh)

    def get(self, spec_text: str) -> judges_lib.Judge:
        if spec_text in self._built:
            return self._built[spec_text]
        spec = judges_lib.parse_judge_spec(spec_text)
        version = self.version(spec_text)
        if spec.kind == "pm":
            judge = judges_lib.PreferenceModelJudge(self.pm_scorer(spec), spec_text, version)
        elif spec.kind == "human":
            judge = judges_lib.HumanLabelJudge(spec.arg, spec_text)
        elif spec.kind == "feedback":
            judge = judges_lib.FeedbackJudge(self._labeler(), spec.arg, spec_text, version)
        else:
            raise ValueError(f"judge {spec_text!r} does not judge anything")
        self._built[spec_text] = judge
        return judge

    def _labeler(self):
        from cai_jax.rl_cai import feedback

        section = self.config.eval.feedback_judge
        model = resolve(section.model_source, self.config, self.workdir).load(seed=self.config.seed,
                                                                               mesh=self.mesh)
        constitution = constitution_from_config(
            ml_collections.ConfigDict({"path": section.constitution, "num_principles": None}))
        return feedback.FeedbackLabeler(
            model, constitution, style=self.config.data.render, num_principles=section.num_principles,
            both_orders=True, num_exemplars=section.num_exemplars, seed=self.config.seed,
            batch_size=section.batch_size, max_len=section.max_seq_len, min_bucket=section.min_bucket,
            mesh=self.mesh)


def comparisons_for(models: Sequence[EvalModel], prompts: Sequence[Prompt],
                    answers: dict) -> list[judges_lib.ModelComparison]:
    """Every pair of models (in display order: A before B) on every prompt."""
    out = []
    for p in prompts:
        for a, b in itertools.combinations(models, 2):
            out.append(judges_lib.ModelComparison(p.id, (Turn("user", p.text),), a.name, b.name,
                                                  answers[(a.name, p.id)]["answer"],
                                                  answers[(b.name, p.id)]["answer"]))
    return out


def judgment_key(dimension: str, judge_name: str, judge_version: str,
                 c: judges_lib.ModelComparison) -> str:
    answers = artifacts.fingerprint([c.answer_a, c.answer_b])
    return f"{dimension}|{judge_name}|{judge_version}|{c.id}|{answers}"


def collect_judgments(dimension: str, spec_text: str,
                      comparisons: Sequence[judges_lib.ModelComparison],
                      log: artifacts.PartialJsonl, factory: JudgeFactory,
                      progress: bool = True) -> list[dict]:
    """Judgment records for the comparisons, from the cache or the judge."""
    version = factory.version(spec_text)
    keys = [judgment_key(dimension, spec_text, version, c) for c in comparisons]
    cached = {r["id"]: r for r in log.records}
    todo = [(k, c) for k, c in zip(keys, comparisons) if k not in cached]
    if todo:
        judge = factory.get(spec_text)
        bar = tqdm(total=len(comparisons), initial=len(comparisons) - len(todo),
                   desc=f"eval {dimension} judge", disable=not progress, dynamic_ncols=True)
        for chunk in artifacts.iter_batches(todo, JUDGE_CHUNK):
            verdicts = judge.judge([c for _, c in chunk])
            records = [{"id": k, "dimension": dimension, "judge": spec_text, "prompt_id": c.prompt_id,
                        "model_a": c.model_a, "model_b": c.model_b,
                        "p_ab": None if v is None else v.p_ab, "p_ba": None if v is None else v.p_ba,
                        "outcome": None if v is None else v.outcome}
                       for (k, c), v in zip(chunk, verdicts)]
            log.extend(records)
            cached.update({r["id"]: r for r in records})
            bar.update(len(chunk))
        bar.close()
    return [cached[k] for k in keys]


# ------------------------------------------------------------ figure 5

def revision_answers(record: dict) -> list[str]:
    """The answer after 0, 1, ..., R rounds of an sl_data record. A dropped round
    leaves the answer unchanged (as the generation stage does)."""
    current = record["initial_answer"]
    out = [current]
    for r in record.get("rounds", []):
        if r.get("dropped") is None and r.get("revision") is not None:
            current = r["revision"]
        out.append(current)
    return out


def revision_scores(sl_records: Sequence[dict], scorer) -> list[dict]:
    """{"id", "scores": PM score after 0..R revisions} per sl_data record."""
    convs, texts, spans = [], [], []
    for rec in sl_records:
        answers = revision_answers(rec)
        spans.append((len(texts), len(answers)))
        convs += [(Turn("user", rec["prompt"]),)] * len(answers)
        texts += answers
    scores = np.asarray(scorer.score(convs, texts), np.float64) if texts else np.zeros(0)
    return [{"id": rec["id"], "scores": [float(s) for s in scores[start:start + n]]}
            for rec, (start, n) in zip(sl_records, spans)]


def _update_revision_scores(ctx, factory: JudgeFactory) -> Optional[int]:
    """Writes eval/revision_scores.jsonl when sl_data.jsonl and the PM exist;
    skips the work when both are unchanged. Returns the number of prompts."""
    sl_path = ctx.path("sl_data.jsonl")
    pm = judges_lib.JudgeSpec("pm")
    if not ctx.config.eval.revision_scores or not storage.exists(sl_path) \
            or not storage.exists(os.path.join(factory.pm_dir(pm), "model.json")):
        return None
    out_path = ctx.path("eval", "revision_scores.jsonl")
    stamp = artifacts.fingerprint({"sl_data": artifacts.file_hash(sl_path), "pm": factory.version("pm")})
    old = artifacts.read_jsonl(out_path) if storage.exists(out_path) else []
    # Every process takes process 0's way: scoring is a collective.
    if processes.broadcast(bool(old) and all(r.get("stamp") == stamp for r in old)):
        return len(old)
    sl_records = artifacts.read_jsonl(sl_path)
    judge = factory.get("pm")
    records = [{**r, "stamp": stamp} for r in revision_scores(sl_records, judge.scorer)]
    if processes.is_writer():
        artifacts.write_jsonl_atomic(out_path, records)
    return len(records)


# ------------------------------------------------------------ the stage

def fit_dimension(records: Sequence[dict], reference: str, section, seed: int):
    """EloResult from judgment records (those with a verdict), or None."""
    matches = [(r["model_a"], r["model_b"], r["outcome"], r["prompt_id"])
               for r in records if r["outcome"] is not None]
    models = {m for r in matches for m in r[:2]}
    if len(models) < 2 or reference not in models:
        return None
    return fit_elo(matches, reference, n_bootstrap=section.n_bootstrap, level=section.level, seed=seed)


def run_stage(ctx) -> dict:
    config, section = ctx.config, ctx.config.eval
    specs = {"harmless": section.harmless_judge, "helpful": section.helpful_judge,
             "harmless_reward_pm": ("none" if section.reward_pm_judge == section.harmless_judge
                                    else section.reward_pm_judge)}
    for dim, spec in specs.items():
        key = "eval.reward_pm_judge" if dim == "harmless_reward_pm" else f"eval.{dim}_judge"
        judges_lib.parse_judge_spec(spec, key=key)  # fail before any sampling
    mesh = ctx.mesh
    models = find_models(config, ctx.workdir)
    prompts = eval_prompts(config.data, section)
    active = {dim: spec for dim, spec in specs.items() if spec != "none" and prompts[DIMENSIONS[dim]]}
    needed = [p for dim in active for p in prompts[DIMENSIONS[dim]]]
    answers = collect_answers(models, needed, ctx.path("eval", "answers.jsonl"), sampling=section.sampling,
                              render=config.data.render, seed=config.seed, mesh=mesh,
                              progress=ctx.progress, shared_prefix=config.sampling.shared_prefix)

    factory = JudgeFactory(config, ctx.workdir, mesh)
    log = _reopen(ctx.path("eval", "judgments.jsonl"))
    reference = BASE if any(m.name == BASE for m in models) else models[0].name
    dimensions, by_dim = {}, {}
    for dim, spec in active.items():
        kind_prompts = prompts[DIMENSIONS[dim]]
        records = collect_judgments(dim, spec, comparisons_for(models, kind_prompts, answers), log,
                                    factory, ctx.progress)
        by_dim[dim] = records
        result = fit_dimension(records, reference, section, config.seed)
        if result is not None:
            dimensions[dim] = (result, {"judge": spec, "prompts": DIMENSIONS[dim],
                                        "n_prompts": len(kind_prompts),
                                        "n_judgments": sum(r["outcome"] is not None for r in records)})
    log.finish(order=[r["id"] for dim in active for r in by_dim[dim]])
    elo = report.elo_document(reference, [m.describe() for m in models], dimensions)
    if processes.is_writer():
        artifacts.write_json_atomic(ctx.path("eval", "elo.json"), elo)
    n_revision = _update_revision_scores(ctx, factory)

    summary = {"models": len(models), "answers": len(answers),
               "judgments": sum(len(v) for v in by_dim.values())}
    if n_revision is not None:
        summary["revision_prompts"] = n_revision
    last_rl = [m for m in models if m.method == "RL-CAI"][-1:]
    for dim, (result, _) in dimensions.items():
        for m in [m for m in models if m.name == "sl_cai"] + last_rl:
            label = "rl_last" if m.step is not None else m.name
            summary[f"{dim}_elo_{label}"] = round(float(result.elo[m.name]), 1) + 0.0  # no "-0.0"
    if processes.is_writer():
        path = report.write_report(ctx.workdir, current_stage={"stage": "eval", "summary": summary},
                                   sample_prompts=section.report_prompts)
        # Written in the stage's staging directory; the pipeline moves it home.
        print(f"report: {os.path.join(pipeline.home_of(ctx.workdir), os.path.basename(path))}", flush=True)
    return summary
