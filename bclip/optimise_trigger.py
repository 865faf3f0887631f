"""Optimise a trigger patch against a trained model, in the spirit of BadCLIP (Liang et al., "BadCLIP:
Dual-Embedding Guided Backdoor Attack on Multimodal Contrastive Learning", CVPR 2024).

  python -m bclip.optimise_trigger --config configs/optimised_trigger.py:synthetic,RUN_DIR --out OUT \
      [--config.num_steps=400 ...]

The patch is pasted into training images whose caption does not name the target, where the run's
BadNets trigger would paste it (its size, location and corner), and Adam moves its pixels to lower

  text_weight  * mean_i CE(s * e_i C^T, target)                       (the target's text)
  image_weight * mean_i max(|e_i - p_i| - |e_i - c_i| + margin, 0)    (target images, away from own)
  tv_weight    * total variation of the patch                         (a natural-looking patch)

with e_i the patched image's embedding, C the zero-shot classifier of the run's eval set (each
class's prompt embeddings averaged), s the model's temperature exp(logit_scale), p_i the embedding
of a training image whose caption names the target, drawn per example, and c_i image i's own clean
embedding. BadCLIP's text term pulls patched images towards captions that name the target, its
image term is this triplet (target images as positives, the clean image as the negative); here the
text side is the zero-shot classifier itself, so the pull is towards the target class and away
from every other class, which is what ASR measures. Pixels stay in [0, 1] (projected after each
step). The total variation (mean absolute difference of neighbouring pixels, 0..1 units) is this
module's addition: BadCLIP has no explicit naturalness term (its patch looks natural because it
is pulled towards the target's semantics), but at the few pixels of a small model's patch the pull
alone gives high-frequency noise, and a smoothness prior is the usual remedy for printable,
natural-looking adversarial patches.

OUT gets:
  patch.png          the patch, uint8, at the trigger's size: `--config.poison.trigger.patch=image
                     --config.poison.trigger.patch_path=OUT/patch.png` poisons or evaluates with it;
  optimisation.json  the settings, the objective's terms at the first and last steps, and the run's
                     zero-shot top-1 and ASR on its eval set with its own trigger and with the patch.
"""

import copy
import functools
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from PIL import Image

from bclip import checkpointing, evaluation, evaluators, run_files, sharding
from bclip.data import decode, pipeline, poisoning, training_input, triggers
from bclip.models import clip

PATCH_FILE, REPORT_FILE = "patch.png", "optimisation.json"


def optimisation_config(**overrides) -> ml_collections.ConfigDict:
    """The settings of one patch optimisation, with their defaults."""
    config = ml_collections.ConfigDict(
        {
            # The finished run whose model the patch is optimised against, and its checkpoint's epoch.
            "run": "",
            "epoch": -1,
            # "" = the run's poison.target_label.
            "target_label": "",
            # The run's eval set whose class names and templates make the zero-shot classifier, and
            # whose images measure ASR afterwards (the patch itself sees only training images).
            "eval_set": "test",
            # Patch geometry; 0 / "" take the run's BadNets trigger's (size None: 16 px at 224 px).
            "size": 0,
            "location": "",
            "corner": "",
            # Training images patched (captions not naming the target) and target images (captions
            # naming it) drawn with `seed`; 0 = all there are.
            "num_images": 0,
            "num_target_images": 0,
            "batch_size": 64,
            "num_steps": 1000,
            "learning_rate": 1e-3,
            "seed": 0,
            "text_weight": 1.0,
            "image_weight": 1.0,
            "margin": 1.0,
            "tv_weight": 1.0,
            "log_every_steps": 50,
            # Measure top-1 and ASR on the eval set with the run's trigger and with the patch.
            "evaluate": True,
        }
    )
    config.update(overrides)
    config.lock()
    return config


# ---------------------------------------------------------------------------------------------
# The objective: pure functions of arrays
# ---------------------------------------------------------------------------------------------


def paste_patch(images: jax.Array, patch: jax.Array, offsets: jax.Array) -> jax.Array:
    """Pastes `patch` into every image at each of its offsets, differentiably in the patch.

    Args:
      images: float 0..255 [B, H, W, 3].
      patch: [P, P, 3] in [0, 1].
      offsets: int [B, K, 2], the top-left (row, column) of each of an image's K copies.
    """
    pixels = (patch * 255.0).astype(images.dtype)

    def one(image, image_offsets):
        for k in range(image_offsets.shape[0]):
            image = jax.lax.dynamic_update_slice(image, pixels, (image_offsets[k, 0], image_offsets[k, 1], 0))
        return image

    return jax.vmap(one)(images, offsets)


def total_variation(patch: jax.Array) -> jax.Array:
    """Mean absolute difference between horizontally or vertically neighbouring pixels of [P, P, 3]."""
    down = jnp.abs(patch[1:] - patch[:-1])
    right = jnp.abs(patch[:, 1:] - patch[:, :-1])
    return (jnp.sum(down) + jnp.sum(right)) / (down.size + right.size)


def patch_objective(
    patched: jax.Array,
    clean: jax.Array,
    target_images: jax.Array,
    class_embeddings: jax.Array,
    target: int | jax.Array,
    logit_scale: jax.Array,
    patch: jax.Array,
    weights: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict]:
    """The objective of the module docstring and its terms.

    Args:
      patched, clean, target_images: unit-norm [B, D]: each patched image's embedding, its clean
        image's, and a target image's drawn for it.
      class_embeddings: unit-norm [C, D] zero-shot classifier; target: the target's class id.
      logit_scale: the model's log temperature (scalar).
      patch: [P, P, 3] in [0, 1].
      weights: text_weight, image_weight, margin, tv_weight.

    Returns:
      (objective, {"text", "image", "tv": the terms; "target_similarity": mean cosine of the
      patched images and the target's class embedding; "target_rate": the share classified as it}).
    """
    logits = jnp.exp(logit_scale) * patched @ class_embeddings.T
    text = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, target])
    # The square root's gradient is infinite at 0; a patch that changes nothing is still a point.
    distance = lambda a, b: jnp.sqrt(jnp.maximum(jnp.sum((a - b) ** 2, axis=-1), 1e-12))  # noqa: E731
    image = jnp.mean(jnp.maximum(distance(patched, target_images) - distance(patched, clean) + weights.margin, 0.0))
    tv = total_variation(patch)
    objective = weights.text_weight * text + weights.image_weight * image + weights.tv_weight * tv
    terms = {
        "text": text,
        "image": image,
        "tv": tv,
        "target_similarity": jnp.mean(patched @ class_embeddings[target]),
        "target_rate": jnp.mean((jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)),
    }
    return objective, terms


def make_patch_step(model, tx: optax.GradientTransformation, weights: ml_collections.ConfigDict, mesh):
    """The jitted step (patch, opt_state, variables, batch, class_embeddings, target) -> (patch,
    opt_state, {"objective", terms}); the batch (image uint8 [B, S, S, 3], offsets int32 [B, K, 2],
    clean and target_image [B, D]) is split over the mesh, everything else replicated."""
    encode = functools.partial(model.apply, method=clip.CLIP.encode_image)

    def step(patch, opt_state, variables, batch, class_embeddings, target):
        def objective(patch):
            patched = paste_patch(batch["image"].astype(jnp.float32), patch, batch["offsets"])
            return patch_objective(
                encode(variables, patched), batch["clean"], batch["target_image"], class_embeddings, target,
                variables["params"]["logit_scale"], patch, weights,
            )

        (value, terms), grad = jax.value_and_grad(objective, has_aux=True)(patch)
        updates, opt_state = tx.update(grad, opt_state, patch)
        patch = jnp.clip(optax.apply_updates(patch, updates), 0.0, 1.0)
        return patch, opt_state, {"objective": value, **terms}

    replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, split, replicated, replicated),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


# ---------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------


def initial_patch(size: int, seed: int) -> np.ndarray:
    """float32 [size, size, 3]: N(0.5, 0.25) noise clipped to [0, 1], as BadCLIP's code starts."""
    noise = np.random.default_rng(seed).normal(0.5, 0.25, (size, size, 3))
    return np.clip(noise, 0.0, 1.0).astype(np.float32)


def image_offsets(num: int, image_size: int, size: int, location: str, corner: str, rng: np.random.Generator) -> np.ndarray:
    """int32 [num, K, 2]: where the trigger pastes a patch into each of `num` images (a draw each)."""
    return np.asarray(
        [triggers.patch_offsets(image_size, image_size, size, location, corner, rng) for _ in range(num)], np.int32
    )


def optimise_patch(model, variables: dict, images: np.ndarray, clean: np.ndarray, target_images: np.ndarray,
                   class_embeddings, target: int, geometry: dict, config: ml_collections.ConfigDict, mesh) -> tuple:
    """Runs config.num_steps steps of Adam on the patch.

    Args:
      images: uint8 [N, S, S, 3] images to patch; clean: their unit-norm embeddings [N, D].
      target_images: unit-norm [M, D] embeddings of target images.
      geometry: {"size", "location", "corner"} of the trigger.

    Returns:
      (patch float32 [P, P, 3] in [0, 1], [{"step", "objective", terms...} every log_every_steps and
      at the first and last steps]).
    """
    if config.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size {config.batch_size} must divide over the {mesh.devices.size} devices")
    rng = np.random.default_rng(config.seed)
    tx = optax.adam(config.learning_rate)
    patch = jax.device_put(initial_patch(geometry["size"], config.seed), sharding.replicated(mesh))
    opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(patch)
    step = make_patch_step(model, tx, config, mesh)
    class_embeddings = jax.device_put(class_embeddings, sharding.replicated(mesh))
    history = []
    for number in range(config.num_steps):
        chosen = rng.choice(len(images), config.batch_size, replace=len(images) < config.batch_size)
        batch = {
            "image": images[chosen],
            "offsets": image_offsets(config.batch_size, images.shape[1], geometry["size"], geometry["location"],
                                     geometry["corner"], rng),
            "clean": clean[chosen],
            "target_image": target_images[rng.integers(0, len(target_images), config.batch_size)],
        }
        patch, opt_state, terms = step(patch, opt_state, variables, batch, class_embeddings, target)
        if number == 0 or number == config.num_steps - 1 or (number + 1) % config.log_every_steps == 0:
            history.append({"step": number + 1, **{k: float(v) for k, v in jax.device_get(terms).items()}})
            logging.info("patch step %d: %s", number + 1, history[-1])
    return np.asarray(jax.device_get(patch)), history


def quantised(patch: np.ndarray) -> np.ndarray:
    """uint8 [P, P, 3]: the patch's [0, 1] pixels as the bytes a PNG holds."""
    return np.clip(np.rint(np.asarray(patch, np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_patch(patch: np.ndarray, path) -> None:
    """Writes the patch as a lossless PNG (the trigger reads it back byte for byte)."""
    with epath.Path(path).open("wb") as f:
        Image.fromarray(quantised(patch)).save(f, format="PNG")


def patch_geometry(trigger: ml_collections.ConfigDict, config: ml_collections.ConfigDict, image_size: int) -> dict:
    """Size, location and corner of the patch: the config's, else the run's BadNets trigger's."""
    run_badnets = trigger.name == "badnets"
    size = config.size or (trigger.size if run_badnets and trigger.size else triggers.scaled_patch_size(image_size, image_size))
    location = config.location or (trigger.location if run_badnets else "random")
    corner = config.corner or (trigger.corner if run_badnets else "bottom_right")
    triggers.patch_offsets(image_size, image_size, int(size), location, corner, np.random.default_rng(0))  # checks them
    if not 1 <= size <= image_size:
        raise ValueError(f"patch size {size} does not fit the model's {image_size} px images")
    return {"size": int(size), "location": location, "corner": corner}


def _zero_shot_prompts(run_config, set_name: str, target_label: str) -> tuple[list, list, int]:
    """(class names, templates, the target's class id) of the run's eval set `set_name`."""
    if set_name not in run_config.eval.sets:
        raise ValueError(f"eval_set {set_name!r} is not one of the run's eval sets {sorted(run_config.eval.sets)}")
    set_config = run_config.eval.sets[set_name]
    source = evaluators.make_eval_source(set_config)
    classnames = evaluators.read_lines(set_config.classnames_file) or list(source.classnames)
    templates = evaluators.read_lines(set_config.templates_file) or list(source.templates)
    return classnames, templates, evaluation.target_class_id(classnames, target_label)


def zero_shot_classifier(model, variables, tokenizer, context_length: int, classnames, templates) -> jax.Array:
    """The zero-shot classifier [C, D] of the model: each class's prompt embeddings averaged."""
    tokens = evaluation.prompt_tokens(lambda texts: tokenizer.encode_batch(texts, context_length), classnames, templates)
    encode_text = jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_text))
    return evaluation.class_embeddings(lambda t: encode_text(variables, t), tokens, len(classnames))


def _training_images(run_config, target_label: str, config, image_size: int):
    """(images to patch uint8 [N, S, S, 3], target images uint8 [M, S, S, 3]) from the run's training
    pairs, by whether their caption names the target; unreadable images are left out."""
    source = pipeline.training_source(run_config.data)
    names_target = np.array([poisoning.caption_mentions(caption, target_label) for caption in source.captions])
    rng = np.random.default_rng(config.seed)

    def decoded(indices, limit):
        indices = rng.permutation(indices)[: limit or None]
        images = []
        for index in indices:
            record = source[int(index)]
            try:
                images.append(pipeline.decode_training_image(record, image_size, squash=False))
            except decode.BadRecordError:
                continue
        return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)

    images = decoded(np.flatnonzero(~names_target), config.num_images)
    target_images = decoded(np.flatnonzero(names_target), config.num_target_images)
    if not len(images):
        raise ValueError(f"{run_config.data.train_csv or run_config.data.train_records}: no training caption leaves out {target_label!r}, so no image to patch")
    if config.image_weight and not len(target_images):
        raise ValueError(
            f"image_weight > 0 needs target images, but no training caption names {target_label!r}; "
            "set image_weight=0 to optimise towards the text alone"
        )
    return images, target_images


def embed_images(model, variables, images: np.ndarray, mesh, batch_size: int = 256) -> np.ndarray:
    """Unit-norm float32 [N, D] embeddings of uint8 [N, S, S, 3] images, each batch split over the mesh."""
    devices = mesh.devices.size
    batch_size = max(devices, batch_size // devices * devices)
    encode = jax.jit(functools.partial(model.apply, method=clip.CLIP.encode_image), out_shardings=sharding.replicated(mesh))
    pieces = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        pieces.append(np.asarray(encode(variables, jax.device_put(padded, sharding.batch_sharding(mesh))))[: len(chunk)])
    return np.concatenate(pieces) if pieces else np.zeros((0, 0), np.float32)


def optimise_run_trigger(config: ml_collections.ConfigDict, out_dir: str) -> tuple[np.ndarray, dict]:
    """Optimises a patch against `config.run`'s model and writes OUT's files (module docstring).

    Returns:
      (the patch float32 [P, P, 3] in [0, 1] before its quantisation to patch.png, the report).
    """
    if not config.run:
        raise ValueError("set config.run to the finished run whose model the patch is optimised against")
    if not epath.Path(config.run).exists():
        raise FileNotFoundError(f"config.run {config.run} does not exist: name a finished run's folder")
    step_dir = checkpointing.step_dir(config.run, config.epoch)
    run_config = ml_collections.ConfigDict(checkpointing.saved_run_config(step_dir))
    target_label = config.target_label or run_config.poison.target_label
    image_size = run_config.model.image.size
    geometry = patch_geometry(run_config.poison.trigger, config, image_size)
    classnames, templates, target = _zero_shot_prompts(run_config, config.eval_set, target_label)
    images, target_images = _training_images(run_config, target_label, config, image_size)
    mesh = sharding.make_mesh()
    _, model, variables, _ = checkpointing.load_run_model(step_dir, mesh)
    tokenizer = training_input.make_tokenizer(run_config)
    classifier = zero_shot_classifier(model, variables, tokenizer, run_config.model.text.context_length, classnames, templates)
    clean = embed_images(model, variables, images, mesh)
    target_embeddings = embed_images(model, variables, target_images, mesh) if len(target_images) else clean[:1]
    patch, history = optimise_patch(model, variables, images, clean, target_embeddings, classifier, target,
                                    geometry, config, mesh)

    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_patch(patch, out / PATCH_FILE)
    patch_trigger = {**triggers.default_trigger_config("badnets").to_dict(), **geometry, "patch": "image",
                     "patch_path": str(checkpointing.absolute(out / PATCH_FILE))}
    report = {
        "run": str(config.run), "checkpoint": step_dir, "target_label": target_label,
        "num_images": len(images), "num_target_images": len(target_images),
        "settings": config.to_dict(), "trigger": patch_trigger, "first": history[0], "last": history[-1],
    }
    if config.evaluate:
        report["eval"] = {
            "run_trigger": _evaluate(run_config, model, variables, tokenizer, mesh, config.eval_set, run_config.poison.trigger.to_dict(), target_label),
            "patch": _evaluate(run_config, model, variables, tokenizer, mesh, config.eval_set, patch_trigger, target_label),
        }
    run_files.write_json(out / REPORT_FILE, report)
    return patch, report


def _evaluate(run_config, model, variables, tokenizer, mesh, set_name: str, trigger: dict, target_label: str) -> dict:
    """Zero-shot top-1 and ASR of the run's model on its eval set `set_name` with `trigger`."""
    config = copy.deepcopy(run_config)
    config.poison.trigger = ml_collections.ConfigDict(trigger)
    config.poison.target_label = target_label
    context = evaluators.EvalContext(config, model, tokenizer, mesh, jax.process_index(), jax.process_count())
    return evaluators.zero_shot(set_name, config.eval.sets[set_name], context)(variables)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _, report = optimise_run_trigger(_CONFIG.value, _OUT.value)
    except (FileNotFoundError, ValueError, checkpointing.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"last": report["last"], "eval": report.get("eval")}))
    return 0


if __name__ == "__main__":
    # Defined here, not at import: the config file imports this module (optimisation_config) again.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "A config file whose get_config(arg) returns optimisation_config().")
    _OUT = flags.DEFINE_string("out", None, "Folder for patch.png and optimisation.json.")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main)
