"""open_clip's train step on the same CLIP as `python -m bclip.bench step`, for a side-by-side
comparison on CPU hosts. Run with a Python that has torch and open_clip (not bclip's JAX):

  TORCH_PYTHON bclip/bench/open_clip_step.py --model tiny-vit --batch_size 128 --objective mmcl

Prints one JSON line ({"pairs_per_s", "s_per_step", ...}). The model is built from the same sizes
as bclip's preset (QuickGELU, as bclip's default); the step is open_clip's ClipLoss and AdamW in
fp32 at torch's default thread count (set OMP_NUM_THREADS / --threads to match). The in-modal
term of mmcl_ssl is written here as bclip's: each image against its view and each caption against
its view, cross-entropy both ways at the model's temperature.
"""

import argparse
import json
import os
import resource
import time

import open_clip
import torch
import torch.nn.functional as F

# bclip's presets (bclip/models/clip.py) in open_clip's terms.
MODELS = {
    "tiny-vit": dict(
        embed_dim=256,
        vision_cfg=dict(image_size=64, patch_size=8, width=256, layers=6, head_width=64, mlp_ratio=4.0),
        text_cfg=dict(context_length=32, vocab_size=49408, width=256, heads=4, layers=6),
    ),
}


def in_modal_loss(a, b, scale):
    logits = scale * a @ b.T
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit", choices=sorted(MODELS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--objective", default="mmcl", choices=["mmcl", "mmcl_ssl"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--max_warmup_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = MODELS[args.model]
    model = open_clip.CLIP(spec["embed_dim"], spec["vision_cfg"], spec["text_cfg"], quick_gelu=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss_fn = open_clip.ClipLoss()
    size, ctx = spec["vision_cfg"]["image_size"], spec["text_cfg"]["context_length"]
    vocab = spec["text_cfg"]["vocab_size"]

    def tokens():
        t = torch.randint(1, vocab - 2, (args.batch_size, ctx))
        t[:, 0], t[:, ctx // 2], t[:, ctx // 2 + 1:] = vocab - 2, vocab - 1, 0
        return t

    images, texts = torch.rand(args.batch_size, 3, size, size), tokens()
    views = (torch.rand(args.batch_size, 3, size, size), tokens()) if args.objective == "mmcl_ssl" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        if views is None:
            image, text, scale = model(images, texts)
            loss = loss_fn(image, text, scale)
        else:
            image, text, scale = model(torch.cat([images, views[0]]), torch.cat([texts, views[1]]))
            n = args.batch_size
            loss = loss_fn(image[:n], text[:n], scale)
            loss = loss + (in_modal_loss(image[:n], image[n:], scale) + in_modal_loss(text[:n], text[n:], scale)) / 2
        loss.backward()
        optimizer.step()
        return loss

    # bclip's warm-up rule (bclip/bench/step.py, `settle`): at least --warmup_steps, then on until
    # 3 steps in a row each fault in at most 1,000 pages, so neither side's timed steps pay for
    # heap growth.
    quiet_in_a_row = 0
    for warmup in range(1, max(args.warmup_steps, args.max_warmup_steps) + 1):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        quiet = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before <= 1000
        quiet_in_a_row = quiet_in_a_row + 1 if quiet else 0
        if warmup >= args.warmup_steps and quiet_in_a_row >= 3:
            break
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    s_per_step = (time.perf_counter() - start) / args.steps
    print(json.dumps({
        "bench": "open_clip_step", "model": args.model, "objective": args.objective, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "pairs_per_s": args.batch_size / s_per_step, "s_per_step": s_per_step, "warmup_steps": warmup, "loss": float(loss.detach()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }), flush=True)


if __name__ == "__main__":
    main()
