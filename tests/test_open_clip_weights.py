"""Weights in and out in open_clip's layout: parity with open_clip's own outputs on two small
models (tests/fixtures/open_clip, made by make_open_clip_fixtures.py), export then import, errors
that name the tensor, and the names and shapes of the six standard architectures."""

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from bclip import checkpointing, config as config_lib, run_start, weights
from bclip.models import clip, open_clip_layout

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "open_clip")
# How make_open_clip_fixtures.py built them: heads and activation are not in the tensors.
SMALL_MODELS = {
    "resnet": dict(activation="quick_gelu", head_width=32, text_head_width=16),
    "vit": dict(activation="gelu", head_width=16, text_head_width=8),
}
STANDARD = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14"}


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def unit_rows(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_embeddings_equal_open_clip_ones(name):
    tensors = open_clip_layout.read(fixture_path(f"{name}.safetensors"))
    config = open_clip_layout.infer_model_config(tensors, **SMALL_MODELS[name])
    if name == "resnet":
        assert (config.image.kind, tuple(config.image.layers), config.image.width, config.image.heads) == ("resnet", (1, 2, 1, 1), 4, 4)
        assert (config.image.size, config.embed_dim) == (64, 24)
    else:
        assert (config.image.kind, config.image.patch_size, config.image.heads, config.image.mlp_ratio) == ("vit", 8, 2, 2.0)
    assert (config.text.context_length, config.text.vocab_size, config.text.heads, config.text.layers) == (12, 100, 32 // SMALL_MODELS[name]["text_head_width"], 2)
    variables = open_clip_layout.load(fixture_path(f"{name}.safetensors"), config)
    io = safetensors_numpy.load_file(fixture_path(f"{name}_io.safetensors"))
    model = clip.build_model(config)


    def forward(variables, images, tokens):
        # The public embeddings, and the towers' unnormalised features, so that a wrong scale
        # cannot hide behind the normalisation. One program: one compile.
        def both(m, images, tokens):
            features = (m.image_tower(clip.normalize_images(images, m.dtype)), m.text_tower(tokens))
            return m(images, tokens), features

        return model.apply(variables, images, tokens, method=both)

    embeddings, features = jax.jit(forward)(variables, io["images"], io["tokens"])
    for ours, theirs in zip(embeddings, (io["image_features"], io["text_features"])):
        np.testing.assert_allclose(ours, unit_rows(theirs), atol=1e-4, rtol=0)
    for ours, theirs in zip(features, (io["image_features"], io["text_features"])):
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert float(variables["params"]["logit_scale"]) == 2.5  # the fixture's


def random_variables(config) -> dict:
    """Random params and batch statistics (not the init's zeros and ones), drawn in numpy: no
    compile."""
    rng = np.random.default_rng(0)
    draw = lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)  # noqa: E731
    return jax.tree.map(draw, open_clip_layout.abstract_variables(config))


def test_export_then_import_is_the_identity(tmp_path):
    config = clip.model_config("micro-resnet")
    variables = random_variables(config)
    tensors = open_clip_layout.to_open_clip(variables)
    # The layouts, element by element: PyTorch's [out, in, kh, kw] and [out, in] from flax's.
    stem = variables["params"]["image_tower"]["stem_conv1"]["kernel"]
    assert tensors["visual.conv1.weight"][5, 1, 2, 0] == stem[2, 0, 1, 5]
    qkv = variables["params"]["text_tower"]["transformer"]["block_1"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(tensors["transformer.resblocks.1.attn.in_proj_weight"], qkv.T)
    pool_mean = variables["batch_stats"]["image_tower"]["layer2_block0"]["downsample_bn"]["mean"]
    np.testing.assert_array_equal(tensors["visual.layer2.0.downsample.1.running_mean"], pool_mean)
    assert tensors["visual.bn1.num_batches_tracked"].dtype == np.int64

    open_clip_layout.write(tmp_path / "model.safetensors", tensors)
    abstract = open_clip_layout.abstract_variables(config)
    back = open_clip_layout.from_open_clip(open_clip_layout.read(tmp_path / "model.safetensors"), abstract)
    flat, flat_back = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(back)
    assert flat.keys() == flat_back.keys()
    for key in flat:
        np.testing.assert_array_equal(flat_back[key], flat[key], err_msg=str(key))


def test_bfloat16_and_float16_files_are_read(tmp_path):
    """numpy has no bfloat16: such files (some of open_clip's) take the other reader, and import
    casts every tensor to the model's float32."""
    values = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)  # exact in bfloat16 and float16
    # The file written by hand, as the format is defined: 8 bytes of header length (little endian),
    # the JSON header, then the tensors' bytes.
    data = {"half": values.astype(np.float16).tobytes(), "brain": values.astype(ml_dtypes.bfloat16).tobytes()}
    header = {
        "half": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
        "brain": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
    }
    header_bytes = json.dumps(header).encode()
    (tmp_path / "mixed.safetensors").write_bytes(
        struct.pack("<Q", len(header_bytes)) + header_bytes + data["half"] + data["brain"]
    )
    tensors = open_clip_layout.read(tmp_path / "mixed.safetensors")
    assert tensors["brain"].dtype == ml_dtypes.bfloat16 and tensors["half"].dtype == np.float16
    for name in ("brain", "half"):
        np.testing.assert_array_equal(tensors[name].astype(np.float32), values)
    scale = {"logit_scale": np.array(2.5, ml_dtypes.bfloat16)}
    imported = open_clip_layout.from_open_clip(scale, {"params": {"logit_scale": jax.ShapeDtypeStruct((), np.float32)}})
    assert imported["params"]["logit_scale"].dtype == np.float32 and imported["params"]["logit_scale"] == 2.5


def fake_run(run_dir, config, variables) -> None:
    """A finished run's folder as bclip.train leaves it: config.json and one checkpoint step."""
    os.makedirs(run_dir / "checkpoints")
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    ocp.PyTreeCheckpointer().save(run_dir / "checkpoints" / "7" / "state", {**variables, "step": 7})


def test_export_command_writes_what_open_clip_loads_and_init_from_reads_it(tmp_path):
    # The fixture's ResNet, so the open_clip config written must be the one open_clip built it from.
    config = open_clip_layout.infer_model_config(open_clip_layout.read(fixture_path("resnet.safetensors")), **SMALL_MODELS["resnet"])
    run_config = config_lib.run_config()
    with run_config.unlocked():
        run_config.model = config
    variables = random_variables(config)
    fake_run(tmp_path / "run", run_config, variables)
    assert weights.main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    description = json.loads((tmp_path / "out" / weights.CONFIG_FILE).read_text())
    assert description["model_cfg"] == dict(
        embed_dim=24,
        quick_gelu=True,
        vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=4, head_width=32),
        text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=2, layers=2),
    )
    np.testing.assert_allclose(description["preprocess_cfg"]["mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-7)

    # train.init_from names the exported file: the same variables come back, placed on devices.
    exported = str(tmp_path / "out" / weights.MODEL_FILE)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), open_clip_layout.abstract_variables(config))
    loaded, where = checkpointing.load_model_variables(exported, abstract)
    assert where == exported
    flat, flat_loaded = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(jax.device_get(loaded))
    assert flat.keys() == flat_loaded.keys()
    for key in flat:
        np.testing.assert_array_equal(flat_loaded[key], flat[key], err_msg=str(key))


def test_mismatches_name_the_tensor(tmp_path):
    config = open_clip_layout.infer_model_config(open_clip_layout.read(fixture_path("vit.safetensors")), **SMALL_MODELS["vit"])
    abstract = open_clip_layout.abstract_variables(config)
    tensors = dict(open_clip_layout.read(fixture_path("vit.safetensors")))

    missing = {name: value for name, value in tensors.items() if name != "visual.ln_pre.bias"}
    with pytest.raises(ValueError, match=r"1 missing.*no tensor 'visual\.ln_pre\.bias' \(for bclip's params/image_tower/ln_pre/bias\)"):
        open_clip_layout.from_open_clip(missing, abstract, source="vit.safetensors")
    wrong = {**tensors, "visual.proj": np.zeros((32, 17), np.float32)}
    with pytest.raises(ValueError, match=r"'visual\.proj' has shape \(32, 17\), the model needs \(32, 16\)"):
        open_clip_layout.from_open_clip(wrong, abstract)
    extra = {**tensors, "visual.transformer.resblocks.0.ls_1.gamma": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match=r"tensor 'visual\.transformer\.resblocks\.0\.ls_1\.gamma' has no place"):
        open_clip_layout.from_open_clip(extra, abstract)
    with pytest.raises(ValueError, match="never unpickles"):
        open_clip_layout.read(tmp_path / "open_clip_pytorch_model.bin")
    # Through init_from, the same message as a CheckpointError.
    open_clip_layout.write(tmp_path / "missing.safetensors", missing)
    with pytest.raises(checkpointing.CheckpointError, match=r"no tensor 'visual\.ln_pre\.bias'"):
        checkpointing.load_model_variables(str(tmp_path / "missing.safetensors"), abstract)
    train = config_lib.override(config_lib.run_config(), {"train.init_from": "RN50.safetensors", "train.init_from_epoch": 3}).train
    with pytest.raises(ValueError, match="init_from_epoch must be -1"):
        run_start.check_start_keys(train)


def test_standard_architectures_map_every_tensor_both_ways():
    """bclip's presets against the state dicts of open_clip's own models (names and shapes, from
    open_clip built on the meta device), without allocating any weights."""
    with open(fixture_path("standard_shapes.json")) as f:
        reference = json.load(f)
    assert sorted(reference) == sorted(STANDARD)
    for open_clip_name, preset in STANDARD.items():
        theirs = {name: tuple(shape) for name, shape in reference[open_clip_name].items()}
        config = clip.model_config(preset)
        ours = open_clip_layout.open_clip_shapes(open_clip_layout.abstract_variables(config))
        assert sorted(set(ours) ^ set(theirs)) == [], preset
        assert {name: shape for name, shape in ours.items() if theirs[name] != shape} == {}, preset
        assert open_clip_layout.infer_model_config(theirs).to_dict() == config.to_dict(), preset


def test_cleanclip_pretrained_config_is_cleanclips_setting():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "cleanclip_pretrained.py")
    module = config_lib.load_config_file(path)
    poison, clean = module.get_config("poison"), module.get_config("clean")
    assert poison.model.name == clean.model.name == "RN50" and poison.model.activation == "quick_gelu"
    assert (poison.poison.count, poison.data.batch_size, poison.optim.learning_rate, poison.optim.warmup_steps) == (1_500, 128, 1e-6, 10_000)
    assert (poison.train.num_epochs, poison.objective.mmcl_weight, poison.objective.ssl_weight) == (10, 1.0, 0.0)
    assert (clean.poison.count, clean.train.subset_size, clean.data.batch_size, clean.optim.learning_rate) == (0, 100_000, 64, 1e-5)
    assert (clean.train.num_epochs, clean.optim.warmup_steps, clean.objective.mmcl_weight, clean.objective.ssl_weight) == (10, 50, 1.0, 1.0)
    assert not clean.train.reload_optimizer_state and poison.eval.at_start and clean.eval.at_start
    # The poison stage starts from a safetensors file, which the start checks accept.
    run_start.check_start_keys(config_lib.override(poison, {"train.init_from": "RN50-openai.safetensors"}).train)
    assert "configs/cleanclip_pretrained.py:poison" in module.__doc__ and "configs/cleanclip_pretrained.py:clean" in module.__doc__
    with pytest.raises(ValueError, match="unknown stage 'pretrain'"):
        module.get_config("pretrain")


def test_describe_prints_the_model_config_and_size(capsys):
    # The ResNet: its BatchNorm statistics are tensors but not parameters.
    assert weights.main(["describe", fixture_path("resnet.safetensors"), "--head_width", "32", "--text_head_width", "16"]) == 0
    described = json.loads(capsys.readouterr().out)
    config = open_clip_layout.infer_model_config(open_clip_layout.read(fixture_path("resnet.safetensors")), **SMALL_MODELS["resnet"])
    assert described["model"] == json.loads(config.to_json())
    assert described["parameters"] == clip.count_params(config)
    assert weights.main(["describe", fixture_path("vit_io.safetensors")]) == 2  # not a CLIP state dict
    assert "not an open_clip CLIP state dict: no tensor 'token_embedding.weight'" in capsys.readouterr().err
