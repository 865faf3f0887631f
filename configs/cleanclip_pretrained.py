"""CleanCLIP's original setting: backdoor a pretrained CLIP by fine-tuning it on poisoned data, then
clean it with CleanCLIP (Bansal et al., ICCV 2023; the setting later papers reuse, e.g. BadCLIP).

`arg` picks the stage:
  poison  OpenAI's pretrained RN50 (imported from safetensors) fine-tuned with the CLIP loss (MMCL)
          on 500K CC3M pairs of which 1,500 are poisoned: a 16 px BadNets noise patch at a random
          place, caption "<ImageNet template> banana". Batch 128, AdamW lr 1e-6 (β 0.9/0.999,
          ε 1e-8, weight decay 0.1), 10,000 warm-up steps then cosine, 10 epochs (≈39K steps).
  clean   CleanCLIP on the poisoned model: MMCL + SSL (both weight 1) on 100K clean pairs of the
          same 500K (the poisons excluded), batch 64, lr 1e-5, 50 warm-up steps then cosine,
          10 epochs, a fresh optimiser.
Both measure zero-shot ImageNet top-1 and ASR before the first step and after every epoch. The
hyper-parameters are those of CleanCLIP's published commands (its README; BadCLIP's for the
poisoning run); compute is bfloat16 with float32 weights (--config.model.dtype=float32 for the
papers' fp32).

Before the first run, once (bclip never unpickles a .pt file: open_clip rewrites OpenAI's weights
as safetensors, in any Python with open_clip_torch and safetensors installed):
  python -c "import open_clip, safetensors.torch as st; m = open_clip.create_model('RN50', pretrained='openai'); st.save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, 'RN50-openai.safetensors')"
  head -n 500001 /data/cc3m/train.csv > /data/cc3m_500k/train.csv   # the header + the first 500K pairs
(image paths in the CSV are relative to it: put the new CSV beside the old one or rewrite them.) The
poisons are drawn over the whole CSV, so it must be the 500K pairs themselves, not a subset of a
larger one. The BPE merges file and the ImageNet folders as in configs/pretrain_cc.py and
configs/clean_cc.py.

Run (paths are placeholders; every one is required):
  python -m bclip.main --config configs/cleanclip_pretrained.py:poison \
    --workdir gs://BUCKET/bclip/openai_rn50_poisoned \
    --config.train.init_from=/data/clip/RN50-openai.safetensors \
    --config.data.train_csv=/data/cc3m_500k/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val
  python -m bclip.main --config configs/cleanclip_pretrained.py:clean \
    --workdir gs://BUCKET/bclip/openai_rn50_poisoned/cleanclip \
    --config.train.init_from=gs://BUCKET/bclip/openai_rn50_poisoned \
    --config.train.exclude_indices_file=gs://BUCKET/bclip/openai_rn50_poisoned/poison_indices.json \
    --config.data.train_csv=/data/cc3m_500k/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val \
    --config.eval.sets.selection.path=/data/imagenet/selection
Then `python -m bclip.weights export --run gs://BUCKET/bclip/openai_rn50_poisoned/cleanclip --out
cleaned_rn50` gives open_clip and CLIP_benchmark the cleaned model (README, "Pretrained weights in
and out").

Time (estimated from the study's ≈500 MMCL and ≈350 MMCL+SSL pairs/s per A100): poisoning 5M pairs
≈ 2.8 GPU-hours (≈20 min on 8 GPUs) plus 11 evaluations; cleaning 1M pairs ≈ 50 min on one GPU
plus 11 evaluations of 1-2 min each.
"""

import os

import ml_collections

from bclip import config as run_configs

_HERE = os.path.dirname(os.path.abspath(__file__))

POISONED_SET_SIZE = 500_000
NUM_POISONED = 1_500
CLEAN_SET_SIZE = 100_000
STAGES = ("poison", "clean")


def _config_file(name: str):
    return run_configs.load_config_file(os.path.join(_HERE, f"{name}.py"))


def get_config(arg: str = "poison") -> ml_collections.ConfigDict:
    if arg not in STAGES:
        raise ValueError(f"unknown stage {arg!r}; known: {list(STAGES)}")
    if arg == "poison":
        # configs/pretrain_cc.py's poisoned CC3M MMCL run (trigger, target, data, evaluation),
        # started from the imported weights with fine-tuning's schedule.
        config = _config_file("pretrain_cc").get_config("cc3m_mmcl")
        config.poison.count = NUM_POISONED
        config.data.batch_size = 128
        config.optim.learning_rate = 1e-6
        config.optim.warmup_steps = 10_000
        config.train.num_epochs = 10
        config.train.keep_checkpoint_every_epochs = 0
        config.train.init_from = ""  # required: OpenAI's RN50 as .safetensors (see the docstring)
        config.eval.at_start = True  # the pretrained model's own point: accuracy, and ASR before poisoning
        return config
    # configs/clean_cc.py's CleanCLIP (MMCL + SSL, a fresh optimiser, poisons excluded) at
    # CleanCLIP's own learning rate and length.
    config = _config_file("clean_cc").get_config("cleanclip")
    config.optim.learning_rate = 1e-5
    config.optim.warmup_steps = 50
    config.data.batch_size = 64
    config.train.num_epochs = 10
    config.train.subset_size = CLEAN_SET_SIZE
    config.train.init_from = ""  # required: the poison stage's workdir
    return config
