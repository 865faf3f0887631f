"""Tests for AutoAugment views made in the train step (bclip.device_augment) against the host's
Pillow operations (bclip.data.image_augment)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bclip import device_augment
from bclip.data import image_augment, pipeline


def photo_like(height=40, width=48, seed=0):
    """uint8 [H, W, 3]: smooth colour regions plus a little noise, not spanning 0..255 fully, so
    that every operation (AutoContrast and Equalize included) changes it."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int64)
    return np.clip(smooth // 2 + 50 + rng.integers(0, 6, smooth.shape), 0, 255).astype(np.uint8)


def pillow(operation, image, magnitude):
    return np.asarray(image_augment.AUTOAUGMENT_OPERATIONS[operation](Image.fromarray(image), magnitude, 0)).astype(int)


def on_device(operation, image, magnitude):
    view = jax.jit(device_augment.OPERATIONS[operation])(jnp.asarray(image, jnp.float32), jnp.float32(magnitude))
    return np.asarray(view).astype(int)


VALUE_MAPS = [
    ("Posterize", [4.0, 6.0, 7.0]),
    ("Solarize", [0.0, 100.5, 150.0]),
    ("Invert", [0.0]),
    ("Equalize", [0.0]),
]
GEOMETRY = [
    ("Rotate", [30.0, -13.3, 3.0]),
    ("ShearX", [0.3, -0.2]),
    ("ShearY", [0.3, -0.1]),
    ("TranslateX", [5.0, -7.5]),
    ("TranslateY", [4.2, -3.0]),
]
ROUNDED = [
    ("AutoContrast", [0.0]),
    ("Color", [-0.9, 0.5]),
    ("Contrast", [-0.9, 0.7]),
    ("Sharpness", [-0.9, 0.9]),
    ("Brightness", [-0.5, 0.9]),
]


def compared(operation, magnitudes):
    """(device view, Pillow view) of three images at each magnitude; each Pillow view differs from
    its input, so every comparison tests something."""
    for seed in range(3):
        image = photo_like(seed=seed)
        for magnitude in magnitudes:
            want = pillow(operation, image, magnitude)
            assert np.any(want != image), (operation, magnitude)
            yield on_device(operation, image, magnitude), want


@pytest.mark.parametrize("operation,magnitudes", VALUE_MAPS, ids=[op for op, _ in VALUE_MAPS])
def test_value_maps_give_pillows_pixels(operation, magnitudes):
    for got, want in compared(operation, magnitudes):
        np.testing.assert_array_equal(got, want, err_msg=operation)


@pytest.mark.parametrize("operation,magnitudes", GEOMETRY, ids=[op for op, _ in GEOMETRY])
def test_geometry_gives_pillows_pixels(operation, magnitudes):
    # Both map pixel centres in 16.16 fixed point. Shears and translations get Pillow's integers
    # exactly; a rotation's come from cos and sin, which may differ from C's in the last bit and
    # move a source coordinate that lies on a pixel boundary to its neighbour.
    for got, want in compared(operation, magnitudes):
        if operation == "Rotate":
            assert np.mean(np.any(got != want, axis=-1)) < 0.005, operation
        else:
            np.testing.assert_array_equal(got, want, err_msg=operation)


@pytest.mark.parametrize("operation,magnitudes", ROUNDED, ids=[op for op, _ in ROUNDED])
def test_blends_and_autocontrast_are_within_one_level_of_pillow(operation, magnitudes):
    # Float32 here, double (AutoContrast) or differently fused float32 (blends) in Pillow: a value
    # that is an integer in exact arithmetic can truncate to the level below on one side.
    for got, want in compared(operation, magnitudes):
        difference = np.abs(got - want)
        assert difference.max() <= 1, operation
        assert np.mean(difference == 0) > 0.97, operation


make_views = jax.jit(device_augment.autoaugment_views)
make_view = jax.jit(device_augment.autoaugment_view, static_argnums=2)


def keys(n, seed=0):
    return pipeline.view_keys(seed, 1, np.arange(n), np.zeros(n, np.int64))


def test_views_are_deterministic_per_key_and_vary_between_keys():
    images = np.stack([photo_like(seed=0)] * 64)
    views = np.asarray(make_views(images, keys(64)))
    assert views.shape == images.shape and views.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(make_views(images, keys(64))), views)
    # One image under 64 keys: many distinct views, and some left unchanged (e.g. when neither
    # step of the drawn sub-policy fires).
    distinct = {view.tobytes() for view in views}
    assert len(distinct) > 20
    changed = np.mean([np.any(view != images[0]) for view in views])
    assert 0.5 < changed < 1.0
    other = np.asarray(make_views(images, keys(64, seed=1)))
    assert np.mean(np.any(other != views, axis=(1, 2, 3))) > 0.5


def test_batch_views_equal_one_image_views():
    images = np.stack([photo_like(seed=s) for s in range(6)])
    batch_keys = keys(6)
    views = np.asarray(make_views(images, batch_keys))
    for image, key, view in zip(images, batch_keys, views):
        single = make_view(jnp.asarray(image), jax.random.wrap_key_data(key, impl="threefry2x32"))
        np.testing.assert_array_equal(np.asarray(single), view)


def test_a_sub_policy_applies_its_steps_in_order_with_their_probabilities():
    image = photo_like()
    image[0, :3] = [[169, 170, 171]]  # about bin 3's threshold, 255 * (1 - 1/3) = 170.00000000000003
    # Solarize always, then Posterize never: Pillow's solarize only.
    for magnitude_bin in (5, 3):
        always_then_never = ((("Solarize", 1.0, magnitude_bin), ("Posterize", 0.0, 9)),)
        magnitude = image_augment.autoaugment_magnitude("Solarize", magnitude_bin, 40, 48)
        for key in keys(4):
            view = make_view(jnp.asarray(image), jax.random.wrap_key_data(key), always_then_never)
            np.testing.assert_array_equal(np.asarray(view), pillow("Solarize", image, magnitude), err_msg=f"bin {magnitude_bin}")
    # Invert then Equalize, both always: the composition, in that order.
    both = ((("Invert", 1.0, None), ("Equalize", 1.0, None)),)
    inverted = pillow("Invert", image, 0.0).astype(np.uint8)
    view = make_view(jnp.asarray(image), jax.random.wrap_key_data(keys(1)[0]), both)
    np.testing.assert_array_equal(np.asarray(view), pillow("Equalize", inverted, 0.0))


def test_rotations_are_mirrored_half_the_time():
    image = photo_like()
    rotate = ((("Rotate", 1.0, 9), ("Rotate", 0.0, 9)),)
    left, right = pillow("Rotate", image, 30.0), pillow("Rotate", image, -30.0)
    seen = {"left": 0, "right": 0}
    for key in keys(200):
        view = np.asarray(make_view(jnp.asarray(image), jax.random.wrap_key_data(key), rotate))
        if np.array_equal(view, left):
            seen["left"] += 1
        else:
            np.testing.assert_array_equal(view, right)
            seen["right"] += 1
    assert 70 < seen["left"] < 130


def test_trigger_patch_survives_colour_operations_in_the_view():
    """A view keeps a poisoned image's trigger unless geometry moves it: the patch pixels change
    together (one value map for the whole image), so the patch stays a patch."""
    image = photo_like(height=32, width=32)
    image[:6, :6] = [255, 255, 0]  # a yellow corner patch
    colour_only = ((("Posterize", 1.0, 8), ("Solarize", 1.0, 3)),)
    view = np.asarray(make_view(jnp.asarray(image), jax.random.wrap_key_data(keys(1)[0]), colour_only))
    patch = view[:6, :6].reshape(-1, 3)
    assert np.all(patch == patch[0])
    assert np.any(view[6:] != patch[0])


def binomial_bound(p, n, standard_errors=5.0):
    """How far a frequency of n independent draws of probability p may lie from p: `standard_errors`
    binomial standard errors, sqrt(p (1 - p) / n); 0 when p is 0 or 1 (no draw may go the other way)."""
    return standard_errors * np.sqrt(p * (1.0 - p) / n)


def test_choices_draw_sub_policies_and_steps_with_the_host_policys_probabilities():
    """The choices of 100,000 views (the pipeline's view keys) against the probabilities that
    image_augment's ImageNet policy table states, each frequency within 5 binomial standard errors
    sqrt(p (1 - p) / n) of its probability, n the number of draws it counts (exactly equal where p
    is 0 or 1):
      - each sub-policy index: 1 / 25 (drawn uniformly, as image_augment.autoaugment_view does);
      - each step of each sub-policy, among the views that drew the sub-policy: the step's
        probability; both steps: the product (independent draws, as on the host);
      - each step's magnitude mirrored: 1/2 among views drawing its sub-policy where the operation
        is in image_augment.SIGNED_OPERATIONS, never otherwise;
      - each operation, among all views: the chance that at least one step applies it,
        sum over sub-policies of (1 - prod over its steps with that operation of (1 - p)) / 25.
    A correct sampler passes each of these ~160 comparisons unless a ~5-sigma deviation occurs
    (normal approximation: about 6e-7 per comparison, under 1e-4 for all of them). With ~4,000 views
    per sub-policy a step's bound is at most 0.04 and its standard error under 0.008, so a step
    probability off by 0.06 or more fails all but rarely."""
    policy = image_augment.AUTOAUGMENT_IMAGENET_SUBPOLICIES
    n = 100_000
    view_keys = jax.random.wrap_key_data(keys(n, seed=2), impl="threefry2x32")
    subpolicy, applied, mirrored = map(np.asarray, jax.jit(jax.vmap(device_augment.autoaugment_choices))(view_keys))
    assert subpolicy.shape == (n,) and applied.shape == mirrored.shape == (n, 2)
    assert set(np.unique(subpolicy)) <= set(range(len(policy)))

    p_subpolicy = 1.0 / len(policy)
    for s, steps in enumerate(policy):
        drew = subpolicy == s
        n_s = int(drew.sum())
        assert abs(n_s / n - p_subpolicy) <= binomial_bound(p_subpolicy, n), (s, n_s / n, p_subpolicy)
        for step, (operation, probability, _) in enumerate(steps):
            frequency = applied[drew, step].mean()
            assert abs(frequency - probability) <= binomial_bound(probability, n_s), (s, step, operation, frequency, probability)
            p_mirror = 0.5 if operation in image_augment.SIGNED_OPERATIONS else 0.0
            frequency = mirrored[drew, step].mean()
            assert abs(frequency - p_mirror) <= binomial_bound(p_mirror, n_s), (s, step, operation, frequency, p_mirror)
        p_both = steps[0][1] * steps[1][1]
        frequency = np.all(applied[drew], axis=1).mean()
        assert abs(frequency - p_both) <= binomial_bound(p_both, n_s), (s, "both steps", frequency, p_both)

    step_operations = np.array([[operation for operation, _, _ in steps] for steps in policy])[subpolicy]  # [n, 2]
    for operation in sorted({operation for steps in policy for operation, _, _ in steps}):
        p_operation = sum(
            1.0 - np.prod([1.0 - probability for op, probability, _ in steps if op == operation]) for steps in policy
        ) / len(policy)
        frequency = np.any(applied & (step_operations == operation), axis=1).mean()
        assert abs(frequency - p_operation) <= binomial_bound(p_operation, n), (operation, frequency, p_operation)


def test_views_apply_the_chosen_steps():
    """Each view is its image after the steps autoaugment_choices drew for its key, in order, with
    the policy's magnitudes mirrored as drawn: so the draws the test above checks are the views'."""
    policy = image_augment.AUTOAUGMENT_IMAGENET_SUBPOLICIES
    images = np.stack([photo_like(seed=s) for s in range(8)] * 8)
    batch_keys = keys(64, seed=3)
    views = np.asarray(make_views(images, batch_keys))
    choices = jax.jit(jax.vmap(device_augment.autoaugment_choices))(jax.random.wrap_key_data(batch_keys, impl="threefry2x32"))
    operations = {name: jax.jit(operation) for name, operation in device_augment.OPERATIONS.items()}
    applied_steps = 0
    for image, view, subpolicy, applied, mirrored in zip(images, views, *map(np.asarray, choices)):
        want = jnp.asarray(image, jnp.float32)
        for (operation, _, magnitude_bin), applies, mirror in zip(policy[subpolicy], applied, mirrored):
            if applies:
                magnitude = image_augment.autoaugment_magnitude(operation, magnitude_bin, *image.shape[:2])
                if operation == "Solarize":
                    magnitude = math.ceil(magnitude)  # the host policy's threshold, rounded up in float64
                want = operations[operation](want, jnp.float32(-magnitude if mirror else magnitude))
                applied_steps += 1
        np.testing.assert_array_equal(view, np.asarray(want).astype(np.uint8), err_msg=str(policy[subpolicy]))
    assert 0 < applied_steps < 2 * len(images)
