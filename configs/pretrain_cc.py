"""Poisoned CLIP RN50 pretraining on CC3M or CC6M with MMCL or MMCL+SSL: the study's four base models.

`arg` picks the run: cc3m_mmcl, cc3m_mmcl_ssl, cc6m_mmcl or cc6m_mmcl_ssl. CC3M gets 1,500 poisoned
pairs and CC6M (the first 6M pairs of CC12M) 3,000: a 16 px BadNets noise patch at a random place,
caption "<ImageNet template> banana". Global batch 2,048 (MMCL) or 1,024 (MMCL+SSL), AdamW lr 1e-3,
weight decay 0.1, 10,000 warm-up steps then cosine, 64 epochs; zero-shot ImageNet accuracy and ASR
after every epoch.

What the paper ran: `arg` + "_reference" (cc3m_mmcl_reference, cc3m_mmcl_ssl_reference,
cc6m_mmcl_reference, cc6m_mmcl_ssl_reference) is the same run poisoned as the paper's code did it:
  - poison.squash=True: a poisoned training image and every triggered ImageNet image is the whole
    image resized to 224 x 224, aspect ratio ignored, before the trigger is pasted;
  - poison.trigger.overflow="wrap": the noise patch's values wrap around modulo 256 (ToPILImage's
    byte conversion) instead of clipping, so the patch is close to uniform random bytes;
  - poison.jpeg_quality=75: a poisoned training image is stored once as a JPEG (Pillow's default
    save) and read back;
  - model.image.batch_norm_group_size=256: BatchNorm statistics over each GPU's 256 images (8 GPUs,
    DistributedDataParallel without SyncBN; with SSL, 128 pairs' originals and their views), not
    over the global batch;
  - data.text_views_per_epoch=False: one EDA caption view per caption for the whole run;
  - model.dtype="float32": the paper's fp32/TF32 compute (bclip's default is bfloat16).
The plain args are bclip's defaults, which fix the reference's mistakes: there, poisoned training
images and triggered test images are squashed while clean images are resized on the shorter side
and centre-cropped, so the geometry alone tells them apart. Use the reference args to reproduce
the paper's numbers. Cleaning such a model (configs/clean_cc.py) measures its ASR the paper's way
with --config.poison.squash=true --config.poison.trigger.overflow=wrap.

Before the first run, once:
  - the training CSV (columns image, caption; image paths relative to the CSV), or CC3M as
    img2dataset downloads it (--output_format webdataset: 00000.tar ... 00331.tar), indexed for
    random access (optional: a run indexes the shards it finds without an index):
      python -m bclip.data.webdataset_index --shards '/data/cc3m/{00000..00331}.tar' --workers 8
  - CLIP's BPE merges file (bpe_simple_vocab_16e6.txt.gz);
  - the ImageNet validation folder as an eval folder (images + labels.csv; the command adds
    classnames.txt and templates.txt, and labels.csv from a per-WordNet-id layout):
      python -m bclip.data.imagenet /data/imagenet/val

Run (paths are placeholders; every one is required):
  python -m bclip.main --config configs/pretrain_cc.py:cc3m_mmcl \
    --workdir gs://BUCKET/bclip/cc3m_mmcl \
    --config.data.train_csv=/data/cc3m/train.csv \
    --config.data.tokenizer.path=/data/clip/bpe_simple_vocab_16e6.txt.gz \
    --config.eval.sets.imagenet.path=/data/imagenet/val

Training on img2dataset's shards instead of the CSV (a brace pattern, a glob or their folder;
--config.data.webdataset_index_dir=DIR where the shards' folder is read-only):
    ... --config.data.train_webdataset='/data/cc3m/{00000..00331}.tar'

ImageNet from TFDS instead of a folder (the prompt files go anywhere readable):
    python -m bclip.data.imagenet /data/imagenet_prompts --prompts_only
    ... --config.eval.sets.imagenet.kind=tfds --config.eval.sets.imagenet.path=imagenet2012 \
        --config.eval.sets.imagenet.data_dir=/data/tfds \
        --config.eval.sets.imagenet.classnames_file=/data/imagenet_prompts/classnames.txt \
        --config.eval.sets.imagenet.templates_file=/data/imagenet_prompts/templates.txt

Hardware: 8×A100-40GB or 8×H100 (256 / 128 pairs per device), or a TPU v4-32 slice (16 chips);
parameters stay replicated (RN50 + text tower ≈ 102M). Time, from the study's runs on 8×A100-40GB
in fp32/TF32: CC6M MMCL 24–28 h, MMCL+SSL 36–40 h; CC3M about half (12–14 h, 18–20 h). Those runs
are bound by JPEG decoding and SSL augmentation on the host (≈500 and ≈350 pairs/s per GPU): this
config runs 16 worker processes; `python -m bclip.bench data --workers 4,16 --threads 1,4` on the
host shows whether fewer processes with several threads each (--config.data.num_threads) feed the
GPUs for less CPU (threads skip the workers' shared-memory hand-off of every batch). With MMCL+SSL,
--config.data.views_on_device=true makes the AutoAugment views in the train step on the GPUs
(bclip/device_augment.py; the host then decodes each image once and augments only captions).
`python -m bclip.bench step --model RN50 --dtype bfloat16 --batch_size 256` and
`python -m bclip.bench views` time the device side on the machine at hand.
"""

import ml_collections

from bclip import config as run_configs

# name -> (poisoned pairs, MMCL weight, SSL weight, global batch size)
RUNS = {
    "cc3m_mmcl": (1_500, 1.0, 0.0, 2_048),
    "cc3m_mmcl_ssl": (1_500, 1.0, 1.0, 1_024),
    "cc6m_mmcl": (3_000, 1.0, 0.0, 2_048),
    "cc6m_mmcl_ssl": (3_000, 1.0, 1.0, 1_024),
}

# The paper's runs as its code poisoned them: reference arg -> the run it is a variant of.
REFERENCE_RUNS = {f"{name}_reference": name for name in RUNS}


# Images per BatchNorm statistics group in the reference: DistributedDataParallel on 8 GPUs without
# SyncBN, so each GPU normalised its own 256 images (2,048 / 8 for MMCL; 1,024 / 8 = 128 pairs,
# originals and views together, for MMCL+SSL).
REFERENCE_BATCH_NORM_GROUP = 256


def use_reference_setup(config: ml_collections.ConfigDict) -> None:
    """Trains as the paper's code did: poisons squashed before the trigger, wrapped noise bytes,
    poisoned training images stored once as JPEG quality 75 (Pillow's default save); BatchNorm
    statistics per GPU's share of the batch; one EDA caption view per caption for the whole run."""
    config.poison.squash = True
    config.poison.jpeg_quality = 75
    config.poison.trigger.overflow = "wrap"
    config.model.image.batch_norm_group_size = REFERENCE_BATCH_NORM_GROUP
    config.data.text_views_per_epoch = False
    # The paper's runs computed in float32 (TF32 matrix products on A100s, which is what XLA's
    # default precision does with float32 on those GPUs); bclip's default computes in bfloat16.
    config.model.dtype = "float32"


def get_config(arg: str = "cc3m_mmcl") -> ml_collections.ConfigDict:
    if arg not in RUNS and arg not in REFERENCE_RUNS:
        raise ValueError(f"unknown pretraining run {arg!r}; known: {sorted([*RUNS, *REFERENCE_RUNS])}")
    num_poisoned, mmcl_weight, ssl_weight, batch_size = RUNS[REFERENCE_RUNS.get(arg, arg)]

    config = run_configs.run_config("RN50", dtype="bfloat16")
    config.objective.mmcl_weight = mmcl_weight
    config.objective.ssl_weight = ssl_weight

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 10_000
    config.optim.weight_decay = 0.1

    # Required, one of: --config.data.train_csv=/path/to/train.csv, or img2dataset's shards
    # --config.data.train_webdataset='/data/cc3m/{00000..00331}.tar' (see the docstring).
    config.data.train_csv = ""
    config.data.tokenizer.kind = "clip_bpe"
    config.data.tokenizer.path = ""  # required: the bpe_simple_vocab_16e6.txt.gz merges file
    config.data.batch_size = batch_size
    config.data.num_workers = 16
    config.data.synonyms = "wordnet"

    config.poison.count = num_poisoned
    config.poison.target_label = "banana"
    # The reference's BadNets trigger: N(0, 1) noise patch, 16 px at 224 px, uniformly random place,
    # redrawn per image. Cleaning configs evaluate ASR with the same trigger.
    config.poison.trigger.name = "badnets"
    config.poison.trigger.patch = "random"
    config.poison.trigger.location = "random"
    config.poison.trigger.size = 16
    if arg in REFERENCE_RUNS:
        use_reference_setup(config)

    config.train.num_epochs = 64
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 1_000
    # Every epoch's checkpoint is kept, so cleaning can start from any (configs/clean_cc.py): each is
    # ≈1.2 GB for RN50 (408 MB of float32 params + 816 MB of Adam moments), ≈78 GB for 64 epochs.
    config.train.keep_checkpoint_every_epochs = 1

    with config.unlocked():
        # Required: --config.eval.sets.imagenet.path=/path/to/imagenet/val (see the docstring).
        config.eval.sets = {"imagenet": run_configs.eval_set_config(kind="folder", path="")}
    config.eval.batch_size = 1_024
    config.eval.num_workers = 16
    config.eval.every_epochs = 1
    config.eval.at_start = False  # a randomly initialised model's accuracy says nothing
    return config
