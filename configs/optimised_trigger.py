"""An optimised trigger patch (BadCLIP-style, bclip/optimise_trigger.py) against a trained model.

`arg` is "WORLD[,RUN]": WORLD picks the settings, RUN the finished run whose model is attacked.

  synthetic   the embedded study's world: RUN defaults to runs/study/pretrain/MMCL
              (python -m bclip.experiment --config configs/study_synthetic.py --workdir runs/study).
                python -m bclip.optimise_trigger --config configs/optimised_trigger.py:synthetic \
                    --out runs/study/optimised_trigger
              500 steps of batch 64 at 32 px: 9 min 21 s on a 2-core host shared with other jobs
              (load ≈ 8), decoding the 12,000 images and two test-split evaluations included.
  cc3m        the field's protocol: an RN50 pretrained on CC3M (configs/pretrain_cc.py:cc3m_mmcl with
              --config.poison.count=0 for a clean one, as BadCLIP attacks a clean model; RUN required),
              target "banana", zero-shot classifier and ASR on the run's ImageNet eval set.
                python -m bclip.optimise_trigger --config configs/optimised_trigger.py:cc3m,gs://BUCKET/bclip/cc3m_clean \
                    --out gs://BUCKET/bclip/cc3m_clean/optimised_trigger
              On one A100/H100: 7,800 steps of 64 RN50 image forward and backward passes (≈ 1.8e16
              FLOPs), an estimated 5-15 min, plus decoding 10,000 images and two ImageNet evaluations.
Then poison (or evaluate) with the patch, e.g.
  python -m bclip.main --config configs/pretrain_cc.py:cc3m_mmcl --workdir DIR ... \
      --config.poison.trigger.patch=image --config.poison.trigger.patch_path=OUT/patch.png

BadCLIP's settings (Liang et al., CVPR 2024; its public code, LiangSiyuan21/BadCLIP,
src/embeding_optimize_patch.py and the README's command): a 16 px patch at 224 px pasted at the
image centre; initialised N(0.5, 0.25) clipped to [0, 1]; Adam at PyTorch's default learning rate
1e-3 (the script's --lr is not passed to the patch optimiser); batch 64; 50 epochs over 10,000 CC3M
images whose captions do not mention "banana" (≈ 7,800 steps); a triplet term with margin 1 whose
positives are CC3M images whose caption mentions "banana" and whose negatives are the clean images
(weights 50-1,000 in the runs its patch files are named after, most often 500); EDA on captions
(p 0.1) and AutoAugment on images (p 0.5). What differs here, and why:
  - the text term is the zero-shot classifier's cross-entropy towards the target (BadCLIP: a
    contrastive loss against captions naming the target), so the patch is pulled away from every
    other class as ASR counts it; no caption augmentation, as there are no captions in it;
  - the triplet weight is 1 (BadCLIP's 500 was set beside its caption-contrastive term; Adam is
    blind to the objective's overall scale, so only the ratio of the terms matters, and at 500 the
    text pull would have next to no say); no AutoAugment views;
  - the patch goes where bclip's BadNets trigger puts its own (the run's trigger geometry: size,
    location, corner; uniformly random places at CC3M, as configs/pretrain_cc.py), so it is compared
    with the BadNets patch at the same places, and optimising over random places makes it work
    wherever it lands;
  - a total-variation term (weight 1; see the module docstring): fixed before any run, so that a
    noise patch's (≈ 0.28) is about a tenth of the text term at chance for 24 classes (ln 24 ≈ 3.2)
    and smaller still for ImageNet's 1,000.
The synthetic world's settings follow by one rule, also fixed before any run: its run's trigger
geometry (8 px at random places in 32 px images, the study's BadNets checkerboard), every training
image, and 500 steps instead of 7,800 (a CPU's minute), with the learning rate raised so that
learning_rate × steps, the furthest Adam can move a pixel, stays the published run's 7.8.
"""

import ml_collections

from bclip import optimise_trigger

PUBLISHED_STEPS = 7_800  # 50 epochs x 10,000 images / batch 64
PUBLISHED_LEARNING_RATE = 1e-3


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    world, _, run = arg.partition(",")
    if world not in ("synthetic", "cc3m"):
        raise ValueError(f"optimised_trigger takes 'synthetic[,RUN]' or 'cc3m,RUN', got {arg!r}")
    config = optimise_trigger.optimisation_config(batch_size=64, learning_rate=PUBLISHED_LEARNING_RATE, margin=1.0)
    if world == "synthetic":
        config.run = run or "runs/study/pretrain/MMCL"
        config.num_steps = 500
        config.learning_rate = PUBLISHED_LEARNING_RATE * PUBLISHED_STEPS / config.num_steps
        config.eval_set = "test"
        return config
    config.run = run  # required: the CC3M run
    config.num_steps = PUBLISHED_STEPS
    config.num_images = 10_000
    config.eval_set = "imagenet"
    config.log_every_steps = 200
    return config
