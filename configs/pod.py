"""The paper's recipe for a real open model on a Cloud TPU slice.

Model: your own HF checkpoint (safetensors, config.json and tokenizer in one
directory; Llama, Mistral or Qwen2 families), e.g. Qwen2.5-7B-Instruct:
--config.model.source=hf:DIR. It is the helpful model every stage starts
from, the AI feedback model and the policy's starting point (model.name is
not read when the source is hf:DIR). Data: your copy of Anthropic's HH-RLHF,
whose first human turns are the prompts (cai_jax/data/prompt_sets.py):
red-team prompts from harmless-base/train.jsonl.gz, helpful prompts from
helpful-base/train.jsonl.gz; 15% of each, chosen by a hash of the prompt,
are held out for evaluation. The paths below are relative to the checkout on
each TPU worker; put the files there or override them.

The paper's settings where it gives them: four critique-revision rounds
(sl_generate.num_revisions), 16 principles (constitution.num_principles: a
seeded 16 of our constitution's 18), AI feedback as multiple-choice
probabilities used as soft labels (feedback.source, the preference model's
soft Bradley-Terry loss), answer pairs sampled at T = 1, and PPO against the
preference model with a KL penalty to the SL-CAI model (ppo.kl, adaptive).
Where it gives none, the scaling table's defaults (experiments/SCALING.md):
bfloat16 compute over float32 weights and Adam moments, full
rematerialisation, the policy and value computing in bfloat16 and the frozen
reference and preference model stored in bfloat16, a separate value model;
mesh tensor=4 with fsdp over the remaining chips. HH-RLHF conversations are
short, so the context is capped at 4096 tokens (model.max_seq_len: few-shot
critique prompts longer than that are dropped as too long) and PPO samples
256-token answers to prompts of up to 512 tokens, 256 rollouts an iteration.

Launch (`--dry_run` prints the gcloud commands; drop it to run them):

    python experiments/tpu_launch.py --tpu_name=cai-pod --zone=us-east5-a \\
        --accelerator_type=v5p-8 --config=configs/pod.py --workdir=runs/pod \\
        --override=model.source=hf:/mnt/disks/models/Qwen2.5-7B-Instruct \\
        --override=data.red_team=/mnt/disks/hh-rlhf/harmless-base/train.jsonl.gz \\
        --override=data.helpful=/mnt/disks/hh-rlhf/helpful-base/train.jsonl.gz --dry_run

(the paths are on the TPU workers; the launcher copies this checkout there,
not your model or data).

Does it fit? With Qwen2.5-7B-Instruct's shapes (the published config.json in
tests/fixtures/hf_configs, no weights), compiled ahead of time for every step
of this config, generation included (SFT, PM and PPO updates, PPO's prefill,
decode and scoring, and the samplers of sl_generate and pairs):

    python experiments/scaling_table.py --config=configs/pod.py \\
        --override=model.source=hf:tests/fixtures/hf_configs/qwen2.5-7b-instruct \\
        --label=qwen2.5-7b-instruct --generations=v5p,v5e \\
        --kinds=sft,pm,ppo,generate:sl_generate,generate:pairs \\
        --results=experiments/results/pod_qwen2.5-7b-instruct.json

         every step fits on             peak per chip   one PPO iteration at the bounds
  v5p    v5p-8 (2x2x1, 4 chips)         72.2 of 95 GiB  43.2 s: generate 1.5, score 6.0, update 35.7
  v5e    v5litepod-32 (4x8, 32 chips)   12.8 of 16 GiB  12.7 s: generate 0.5, score 1.7, update 10.4

On v5e, SFT alone fits on v5litepod-16 and pairs' sampler on v5litepod-8;
the preference model's update (18 GiB per chip on 16 chips) and PPO need
32 chips, with 3 GiB of headroom. The bounds: generation's prefill at peak
FLOP/s and its decode steps at HBM bandwidth, the scoring passes and 4
epochs x 4 minibatch updates of policy and value at peak FLOP/s; a real run
is slower by its MFU. Every step's memory and bounds are in
experiments/results/pod_qwen2.5-7b-instruct.json; experiments/SCALING.md
says how they are computed. The AI feedback's multiple-choice scoring is a
forward pass of the base model, smaller than the PM's update, and is not
compiled separately.
"""
import os

from cai_jax.config import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

HH_RLHF = "data/hh-rlhf"


def get_config():
    config = _base.experiment_config()
    config.model.source = "hf:checkpoints/model"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "full"
    config.model.max_seq_len = 4096
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 4

    config.data.red_team = f"{HH_RLHF}/harmless-base/train.jsonl.gz"
    config.data.helpful = f"{HH_RLHF}/helpful-base/train.jsonl.gz"
    config.constitution.num_principles = 16
    # Decoding a 7B model is bound by reading its weights: wide batches cost little more.
    config.sampling.batch_size = 64

    config.sl_generate.num_revisions = 4
    config.sl_train.batch_size = 64
    config.sl_train.max_seq_len = 1024

    config.pairs.temperature = 1.0
    config.pairs.max_new_tokens = 256
    config.feedback.source = "multiple_choice"
    config.pm_train.batch_size = 64
    config.pm_train.max_seq_len = 1024

    config.ppo.rollout_batch_size = 256
    config.ppo.sample_batch_size = 256
    config.ppo.minibatch_size = 64
    config.ppo.epochs = 4
    config.ppo.max_prompt_tokens = 512
    config.ppo.max_new_tokens = 256
    config.ppo.share_trunk = False
    config.ppo.dtype = "bfloat16"
    config.ppo.ref_dtype = "bfloat16"
    config.ppo.pm_dtype = "bfloat16"
    config.ppo.kl.adaptive = True
    config.lock()
    return config
