"""bclip's CLIP variables in open_clip's state-dict layout and back, for checkpoints in
safetensors form (OpenAI CLIP as open_clip loads it, open_clip's own models, CLIP_benchmark).

Checked against open_clip's model code (ModifiedResNet, VisionTransformer, CLIP.encode_text) and
by the parity tests: the architectures agree as built by `model_config` (BatchNorm and LayerNorm
eps 1e-5, average-pool anti-aliasing before strided convs and shortcuts, attention pooling queried
by the grid mean, ln_pre and ln_post in the ViT, causal text transformer). Two things a checkpoint
does not say and the model config must: the activation (OpenAI's models use QuickGELU, bclip's
default; open_clip's own, e.g. LAION's, GELU: `activation="gelu"`) and the number of heads
(`infer_model_config` assumes open_clip's 64 channels per head). open_clip pools the text at
argmax(token id) and bclip at the first end-of-text token: the same position for every caption
OpenAI's tokenizer makes, since end-of-text is its largest id.

The names follow the module paths one to one; only the tensor layouts differ (PyTorch keeps
dense weights as [out, in] and convolutions as [out, in, kh, kw]; flax as [in, out] and
[kh, kw, in, out]).
"""

import math
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import ml_dtypes
import numpy as np
import safetensors
from etils import epath
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from bclip.models import clip

# One open_clip name per bclip module name; the others keep theirs ('ln_1', 'attn', 'conv1', ...).
_MODULE_NAMES = {
    "image_tower": "visual",
    "patch_embed": "conv1",
    "downsample_conv": "downsample.0",  # downsample.-1 is the parameter-free average pool
    "downsample_bn": "downsample.1",
    "out": "out_proj",
    "mlp_fc": "mlp.c_fc",
    "mlp_proj": "mlp.c_proj",
}
# Module names with an index: (bclip pattern, open_clip replacement).
_NUMBERED_MODULES = (
    (re.compile(r"stem_conv(\d)"), r"conv\1"),
    (re.compile(r"stem_bn(\d)"), r"bn\1"),
    (re.compile(r"layer(\d)_block(\d+)"), r"layer\1.\2"),
    (re.compile(r"block_(\d+)"), r"resblocks.\1"),
)
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
# Tensors an open_clip file may hold that have no bclip variable: BatchNorm's step counter, and the
# integer metadata OpenAI's own state dicts carry.
_IGNORED_ON_IMPORT = re.compile(r"(.*\.num_batches_tracked|input_resolution|context_length|vocab_size)$")


def _open_clip_name(key: tuple[str, ...]) -> str:
    """A flattened variable key ('params', 'image_tower', 'stem_conv1', 'kernel') -> its open_clip
    name ('visual.conv1.weight'). The collection ('params' or 'batch_stats') is not part of it."""
    *modules, leaf = key[1:]
    if modules and modules[0] == "text_tower":
        modules = modules[1:]  # open_clip keeps the text tower at the top level
    if modules and modules[-1] == "qkv":
        # The fused projection is a parameter of the attention module itself.
        return ".".join([*(_module_name(m) for m in modules[:-1]), f"in_proj_{_LEAF_NAMES.get(leaf, leaf)}"])
    return ".".join([*(_module_name(m) for m in modules), _LEAF_NAMES.get(leaf, leaf)])


def _module_name(name: str) -> str:
    if name in _MODULE_NAMES:
        return _MODULE_NAMES[name]
    for pattern, replacement in _NUMBERED_MODULES:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return name


def _layout(key: tuple[str, ...], ndim: int) -> str:
    """How a variable's array is laid out in open_clip: 'conv', 'dense' (both transposed from
    flax's) or 'same'."""
    if key[-1] != "kernel":
        return "same"
    return {4: "conv", 2: "dense"}[ndim]


def _to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.transpose(array, (3, 2, 0, 1))  # [kh, kw, in, out] -> [out, in, kh, kw]
    if layout == "dense":
        return array.T  # [in, out] -> [out, in]
    return array


def _from_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    if layout == "dense":
        return array.T
    return array


def name_table(variables: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], str]]:
    """{open_clip name: (flattened bclip key, layout)} for every array of `variables`
    ({'params'[, 'batch_stats']}, arrays or jax.ShapeDtypeStruct shapes)."""
    table = {}
    for key, leaf in traverse_util.flatten_dict(dict(variables)).items():
        name = _open_clip_name(key)
        if name in table:
            raise ValueError(f"bclip variables {key} and {table[name][0]} both map to open_clip's {name!r}")
        table[name] = (key, _layout(key, len(leaf.shape)))
    return table


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The open_clip shape of a bclip variable of `shape`."""
    if layout == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "dense":
        return (shape[1], shape[0])
    return tuple(shape)


def open_clip_shapes(variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{open_clip name: shape} of the state dict open_clip's model of the same architecture has,
    BatchNorm's num_batches_tracked counters included. Works on abstract shapes."""
    flat, shapes = traverse_util.flatten_dict(dict(variables)), {}
    for name, (key, layout) in name_table(variables).items():
        shapes[name] = torch_shape(flat[key].shape, layout)
        if key[0] == "batch_stats" and key[-1] == "mean":
            shapes[name.removesuffix("running_mean") + "num_batches_tracked"] = ()
    return shapes


def to_open_clip(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """bclip variables {'params'[, 'batch_stats']} -> open_clip's state dict as float32 numpy
    arrays (with int64 zero num_batches_tracked counters, so open_clip's strict load accepts it)."""
    flat = traverse_util.flatten_dict(dict(variables))
    tensors = {}
    for name, (key, layout) in name_table(variables).items():
        # np.array, not np.ascontiguousarray, which makes logit_scale's 0-d array 1-d.
        tensors[name] = np.array(_to_torch_layout(np.asarray(flat[key], np.float32), layout), order="C")
        if key[0] == "batch_stats" and key[-1] == "mean":
            tensors[name.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return tensors


def from_open_clip(
    tensors: Mapping[str, np.ndarray], abstract_variables: Mapping[str, Any], source: str = "the checkpoint"
) -> dict[str, Any]:
    """open_clip's state dict -> bclip variables in the structure, shapes and dtypes of
    `abstract_variables` ({'params'[, 'batch_stats']}), as numpy arrays.

    Every variable must have its tensor, of the matching shape, and every tensor (but BatchNorm's
    step counters) its variable; the error names the tensors that do not fit. `source` names the
    file in errors.
    """
    abstract = traverse_util.flatten_dict(dict(abstract_variables))
    table = name_table(abstract_variables)
    missing = sorted(name for name in table if name not in tensors)
    unexpected = sorted(name for name in tensors if name not in table and not _IGNORED_ON_IMPORT.fullmatch(name))
    wrong_shape = []
    for name, (key, layout) in table.items():
        if name in tensors:
            want = torch_shape(abstract[key].shape, layout)
            if tuple(tensors[name].shape) != want:
                wrong_shape.append(f"{name!r} has shape {tuple(tensors[name].shape)}, the model needs {want}")
    if missing or unexpected or wrong_shape:
        problems = (
            [f"no tensor {name!r} (for bclip's {'/'.join(table[name][0])})" for name in missing[:5]]
            + [f"tensor {name!r} has no place in the model" for name in unexpected[:5]]
            + wrong_shape[:5]
        )
        raise ValueError(
            f"{source} does not fit the configured model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} of other shape; is model.* the checkpoint's architecture? "
            "`python -m bclip.weights describe FILE` infers it): " + "; ".join(problems)
        )
    flat = {}
    for name, (key, layout) in table.items():
        flat[key] = np.asarray(_from_torch_layout(np.asarray(tensors[name]), layout), abstract[key].dtype)
    variables = traverse_util.unflatten_dict(flat)
    # A collection without arrays (a ViT's empty 'batch_stats') keeps its place.
    return {collection: variables.get(collection, {}) for collection in abstract_variables}


# --------------------------------------------------------------------------- files


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (local or remote, e.g. gs://) as numpy arrays; no pickle:
    .bin and .pt files are refused."""
    path = epath.Path(path)
    if not path.name.endswith(".safetensors"):
        raise ValueError(
            f"{path} is not a .safetensors file; bclip never unpickles .pt/.bin checkpoints. Rewrite it "
            "with open_clip as the README's 'Pretrained weights in and out' shows"
        )
    if not path.exists():
        raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
    tensors = {}
    for name, tensor in safetensors.deserialize(path.read_bytes()):
        if tensor["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {path} has dtype {tensor['dtype']}; bclip reads {sorted(_SAFETENSORS_DTYPES)}")
        tensors[name] = np.frombuffer(tensor["data"], _SAFETENSORS_DTYPES[tensor["dtype"]]).reshape(tensor["shape"])
    return tensors


# safetensors' dtype names. numpy has no bfloat16 (safetensors' numpy API cannot read it): ml_dtypes' is used.
_SAFETENSORS_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write tensors as safetensors (local or remote), marked as PyTorch tensors (what Hugging Face
    tooling expects)."""
    epath.Path(path).write_bytes(safetensors_numpy.save(dict(tensors), metadata={"format": "pt"}))


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'params', 'batch_stats'} shapes of the model `config` describes, allocating nothing."""
    model = clip.build_model(config)
    shapes = jax.eval_shape(
        lambda rng: clip.init_variables(model, rng, config.image.size, config.text.context_length),
        jax.random.key(0),
    )
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def load(path: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The variables ({'params', 'batch_stats'}, numpy) of the model `config` describes, from an
    open_clip safetensors file."""
    return from_open_clip(read(path), abstract_variables(config), source=os.fspath(path))


# --------------------------------------------------------------------------- architecture


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    """How many distinct indices fill the (one) group of `pattern` among the names."""
    compiled = re.compile(pattern)
    return len({match.group(1) for name in shapes if (match := compiled.fullmatch(name))})


def _grid(positions: int, where: str) -> int:
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"{where} has {positions} positions, not a square grid plus one")
    return grid


def _tuples(section: Mapping[str, Any]) -> dict[str, Any]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}


def infer_model_config(
    shapes: Mapping[str, Any], activation: str = "quick_gelu", head_width: int = 64, text_head_width: int = 64
) -> ml_collections.ConfigDict:
    """The bclip model config of an open_clip state dict, from its tensor shapes ({name: array or
    shape}): the preset whose shapes these are (RN50, ViT-B/32, ...), or the RN50 / ViT-B/32
    preset with every shape overridden.

    Heads and activation are not in the shapes: heads are width // head_width (open_clip's rule:
    64 channels per head; the ResNet's attention pool has 32 * width channels), and `activation`
    is "quick_gelu" for OpenAI's weights and "gelu" for most of open_clip's own.
    """
    shapes = {name: tuple(getattr(value, "shape", value)) for name, value in shapes.items()}
    required = ["token_embedding.weight", "positional_embedding", "text_projection", "visual.conv1.weight"]
    absent = [name for name in required if name not in shapes]
    if absent:
        raise ValueError(f"not an open_clip CLIP state dict: no tensor {absent[0]!r}")
    if "visual.attnpool.positional_embedding" in shapes:
        width = shapes["visual.conv3.weight"][0]
        pool_positions = shapes["visual.attnpool.positional_embedding"][0]
        image = dict(
            kind="resnet",
            size=32 * _grid(pool_positions, "visual.attnpool.positional_embedding"),
            layers=tuple(_count(shapes, rf"visual\.layer{stage}\.(\d+)\.conv1\.weight") for stage in range(1, 5)),
            width=width,
            heads=32 * width // head_width,
        )
        embed_dim, base = shapes["visual.attnpool.c_proj.weight"][0], "RN50"
    elif "visual.class_embedding" in shapes:
        width, patch_size = shapes["visual.class_embedding"][0], shapes["visual.conv1.weight"][-1]
        grid = _grid(shapes["visual.positional_embedding"][0], "visual.positional_embedding")
        image = dict(
            kind="vit",
            size=grid * patch_size,
            patch_size=patch_size,
            width=width,
            layers=_count(shapes, r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.weight"),
            heads=width // head_width,
            mlp_ratio=shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0] / width,
        )
        embed_dim, base = shapes["visual.proj"][1], "ViT-B/32"
    else:
        raise ValueError(
            "the image tower is neither OpenAI's ModifiedResNet (visual.attnpool.*) nor its ViT "
            "(visual.class_embedding); bclip has no other"
        )
    text_width = shapes["token_embedding.weight"][1]
    text = dict(
        context_length=shapes["positional_embedding"][0],
        vocab_size=shapes["token_embedding.weight"][0],
        width=text_width,
        layers=_count(shapes, r"transformer\.resblocks\.(\d+)\.ln_1\.weight"),
        heads=text_width // text_head_width,
    )
    if shapes["text_projection"][1] != embed_dim:
        raise ValueError(
            f"text_projection has shape {shapes['text_projection']} but the image tower projects to {embed_dim}"
        )
    options = dict(activation=activation, siglip_bias="logit_bias" in shapes)
    for name, preset in clip.PRESETS.items():
        if (preset["embed_dim"], _tuples(preset["text"]), _tuples(preset["image"])) == (embed_dim, text, image):
            return clip.model_config(name, **options)
    return clip.model_config(base, image=image, text=text, embed_dim=embed_dim, **options)


def open_clip_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """open_clip's description of the model a bclip model config describes: the open_clip_config.json
    ({"model_cfg", "preprocess_cfg"}) that open_clip's "local-dir:" and "hf-hub:" loaders read."""
    image, text = config.image, config.text
    if image.kind == "resnet":
        vision = dict(image_size=image.size, layers=list(image.layers), width=image.width, head_width=32 * image.width // image.heads)
    else:
        vision = dict(
            image_size=image.size,
            patch_size=image.patch_size,
            width=image.width,
            layers=image.layers,
            head_width=image.width // image.heads,
            mlp_ratio=image.mlp_ratio,
        )
    model = dict(
        embed_dim=config.embed_dim,
        quick_gelu=config.activation == "quick_gelu",
        vision_cfg=vision,
        text_cfg=dict(
            context_length=text.context_length,
            vocab_size=text.vocab_size,
            width=text.width,
            heads=text.heads,
            layers=text.layers,
        ),
    )
    if config.siglip_bias:
        model["init_logit_bias"] = clip.LOGIT_BIAS_INIT  # only makes open_clip create the tensor
    pixels = dict(
        size=image.size,
        mean=[value / 255 for value in clip.IMAGE_MEAN],
        std=[value / 255 for value in clip.IMAGE_STD],
    )
    return {"model_cfg": model, "preprocess_cfg": pixels}
