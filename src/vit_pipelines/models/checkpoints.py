"""Checkpoints in and out: this project's folders, Hugging Face `transformers`, timm and vit_jax / big_vision.

Loading follows vit_jax's `checkpoint.load_pretrained`, one path per format: read the tensors → rename them to
this project's names and find the `ViTConfig` → reconcile (resize the position embedding, replace the head) →
build the model and load it strictly. Nothing is unpickled: safetensors, `torch.load(weights_only=True)` and
`np.load(allow_pickle=False)` only. All formats run with this model's exact GELU and LayerNorm eps 1e-6, as
timm and transformers run the original (tanh-GELU) JAX weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vit_pipelines.models import hub
from vit_pipelines.models.config import VARIANTS, ViTConfig
from vit_pipelines.models.posemb import resize_pos_embed
from vit_pipelines.models.resnet import RESNET_LAYERS, resnet_stem_from_name
from vit_pipelines.models.vit import LN_EPS, VisionTransformer

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HF_PICKLE_WEIGHTS = "pytorch_model.bin"  # read with torch.load(weights_only=True)
FORMATS = ("native", "hf", "timm", "big_vision")
# timm checkpoints do not record the head count; Table 1 ties it to the width.
HEADS_BY_WIDTH = {width: heads for _, width, _, heads in VARIANTS.values()}

# (source prefix, our prefix); "{i}" is a layer index. q/k/v become our fused qkv in `_merge_qkv`.
HF_SAVED_NAMES = (  # as transformers 4.x and 5.x write them to disk (the names on the Hub)
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1."),
    ("encoder.layer.{i}.attention.attention.query.", "blocks.{i}.attn.q."),
    ("encoder.layer.{i}.attention.attention.key.", "blocks.{i}.attn.k."),
    ("encoder.layer.{i}.attention.attention.value.", "blocks.{i}.attn.v."),
    ("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    ("encoder.layer.{i}.layernorm_after.", "blocks.{i}.norm2."),
    ("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.0."),
    ("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.3."),
    ("layernorm.", "norm."),
    ("pooler.dense.", "pre_logits.0."),  # ViTModel's pooler: tanh(dense(class token)), the JAX pre-logits
    ("classifier.", "head."),
)
HF_MODULE_NAMES = (  # transformers 5.x modules' own names, as in an in-memory `model.state_dict()`
    ("layers.{i}.layernorm_before.", "blocks.{i}.norm1."),
    ("layers.{i}.attention.q_proj.", "blocks.{i}.attn.q."),
    ("layers.{i}.attention.k_proj.", "blocks.{i}.attn.k."),
    ("layers.{i}.attention.v_proj.", "blocks.{i}.attn.v."),
    ("layers.{i}.attention.o_proj.", "blocks.{i}.attn.proj."),
    ("layers.{i}.layernorm_after.", "blocks.{i}.norm2."),
    ("layers.{i}.mlp.fc1.", "blocks.{i}.mlp.0."),
    ("layers.{i}.mlp.fc2.", "blocks.{i}.mlp.3."),
)
TIMM_NAMES = (  # everything else already has timm's name
    ("blocks.{i}.mlp.fc1.", "blocks.{i}.mlp.0."),
    ("blocks.{i}.mlp.fc2.", "blocks.{i}.mlp.3."),
    ("pre_logits.fc.", "pre_logits.0."),
)
BIG_VISION_NAMES = (  # "/" becomes "." and kernel/scale become weight afterwards
    ("embedding/", "patch_embed.proj."),
    ("cls", "cls_token"),
    ("Transformer/posembed_input/pos_embedding", "pos_embed"),  # vit_jax: covers the class token
    ("pos_embedding", "pos_embed"),  # big_vision: patches only
    ("Transformer/encoderblock_{i}/LayerNorm_0/", "blocks.{i}.norm1."),
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/", "blocks.{i}.attn.q."),  # vit_jax
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/key/", "blocks.{i}.attn.k."),
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/value/", "blocks.{i}.attn.v."),
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/", "blocks.{i}.attn.proj."),
    ("Transformer/encoderblock_{i}/LayerNorm_2/", "blocks.{i}.norm2."),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/", "blocks.{i}.mlp.0."),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_1/", "blocks.{i}.mlp.3."),
    (
        "Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query/",
        "blocks.{i}.attn.q.",
    ),  # big_vision
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/key/", "blocks.{i}.attn.k."),
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/value/", "blocks.{i}.attn.v."),
    ("Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/", "blocks.{i}.attn.proj."),
    ("Transformer/encoderblock_{i}/LayerNorm_1/", "blocks.{i}.norm2."),
    ("Transformer/encoderblock_{i}/MlpBlock_0/Dense_0/", "blocks.{i}.mlp.0."),
    ("Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/", "blocks.{i}.mlp.3."),
    ("Transformer/encoder_norm/", "norm."),
    ("pre_logits/", "pre_logits.0."),
    ("head/", "head."),
    ("conv_root/", "patch_embed.stem.conv_root."),  # the R50 hybrid's root and stages, as in resnet.py
    ("gn_root/", "patch_embed.stem.gn_root."),
    ("block", "patch_embed.stem.block"),
)


def load_pretrained(
    source: str | Path | Mapping[str, Any],
    format: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    *,
    hf_config: Mapping[str, Any] | Any | None = None,
    num_heads: int | None = None,
    resize_method: str = "zoom_bilinear",
    features_only: bool = False,
) -> VisionTransformer:
    """A `VisionTransformer` (eval mode) with the weights of `source`, giving the source framework's logits.

    `source`: a folder (`config.json` + `model.safetensors` or `pytorch_model.bin`: "native", "hf" or timm's), a
    file (`.safetensors`, `.npz`, or a weights-only torch file), a name (`hf:<repo id>[@revision]`,
    `timm:<model name>`) or URL (`gs://`, `s3://`, `https://`: `models/hub.py`), or an in-memory state dict / npz
    mapping. `format`:
    "auto" (from the folder's config or the keys) or one of FORMATS. `image_size` (pixels) different from the
    source's resizes the position embedding with `resize_method` ("zoom_bilinear" as vit_jax, or "bicubic" as
    timm); `num_classes` different from the source's puts ONE zero-initialised Linear(D→K) in place of the head
    and drops the pre-logits layer (paper §3.2); a source without a head needs `num_classes`, unless
    `features_only` (few-shot probes, feature extraction): it then gets an empty head (`num_classes` 0).
    `hf_config`: the `transformers.ViTConfig` (or its dict) of an HF state dict given without its folder.
    `num_heads`: timm only, whose weights do not record it; by default Table 1's count for the width.
    timm and npz sources are assumed to have a square patch grid, as vit_jax and big_vision assume.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    folder_config = None
    if isinstance(source, str):  # a name (hf:…, timm:…) or URL: its local copy
        source, implied = hub.resolve(source)
        format = implied if format == "auto" and implied else format
    if isinstance(source, Mapping):
        tensors = _as_tensors(source)
    elif Path(source).is_dir():
        folder_config, tensors = _read_folder(Path(source))
        kind = folder_config.get("model_type") or folder_config.get("architecture")  # HF's, timm's
        if kind and not str(kind).startswith("vit"):
            raise ValueError(f"{source} holds a {kind!r} model, not a Vision Transformer")
    else:
        tensors = _read_file(Path(source))
    if format == "auto":
        format = _detect_format(tensors, folder_config)
    if format == "native":
        if folder_config is None:
            raise ValueError("a native checkpoint is a folder with config.json and model.safetensors")
        config, state = ViTConfig.from_dict(folder_config), tensors
    elif format == "hf":
        hf_config = hf_config if hf_config is not None else folder_config
        if hf_config is None:
            raise ValueError("HF weights need their config: pass hf_config= or the folder with config.json")
        config, state = _from_hf(tensors, hf_config)
    elif format == "timm":
        config, state = _from_timm(tensors, num_heads)
    else:
        config, state = _from_big_vision(tensors)
    return reconcile(config, state, image_size, num_classes, resize_method, features_only)


def export_hf(model: VisionTransformer, folder: str | Path) -> None:
    """Write `folder/config.json` + `folder/model.safetensors` for `transformers.ViTForImageClassification
    .from_pretrained(folder)`, with the names transformers writes to disk (read by its 4.x and 5.x).

    HF's ViT has a [class] token, a learned 1-D posemb, no pre-logits layer and no ResNet stem; a model with
    anything else raises ValueError. Images are the user's business on both sides: HF gets the same tensor.
    """
    c = model.config
    unsupported = {
        "pool='gap'": c.pool != "tok",
        f"posemb={c.posemb!r}": c.posemb != "learn",
        "a pre-logits layer": c.representation_size is not None,
        f"the hybrid stem {c.hybrid!r}": c.hybrid is not None,
    }
    problems = [name for name, present in unsupported.items() if present]
    if problems:
        raise ValueError(f"transformers' ViT cannot express {', '.join(problems)}")
    state = _rename(_split_qkv(model.state_dict()), [(ours, hf) for hf, ours in HF_SAVED_NAMES])
    hf = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c.width,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": LN_EPS,
        "qkv_bias": True,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "image_size": _hf_size(c.image_size),
        "patch_size": _hf_size(c.patch_size),
        "num_channels": c.in_chans,
        "id2label": {str(i): f"LABEL_{i}" for i in range(c.num_classes)},
    }
    tensors = {k if k.startswith("classifier.") else f"vit.{k}": v for k, v in state.items()}
    _write_folder(Path(folder), tensors, json.dumps(hf, indent=2))


def write_native(model: VisionTransformer, folder: str | Path, tensors: Tensors | None = None) -> None:
    """This project's checkpoint: `folder/model.safetensors` + `folder/config.json` (the `ViTConfig`); the
    weights are `tensors` where given (a snapshot of `model`'s state dict), else the model's own."""
    _write_folder(Path(folder), model.state_dict() if tensors is None else tensors, model.config.to_json())


def read_native(folder: str | Path) -> tuple[ViTConfig, Tensors]:
    """The `ViTConfig` and state dict of a folder written by `write_native`."""
    values, tensors = _read_folder(Path(folder))
    return ViTConfig.from_dict(values), tensors


def _write_folder(folder: Path, tensors: Mapping[str, torch.Tensor], config_json: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    _readable_as_any_file(folder / WEIGHTS)
    (folder / CONFIG).write_text(config_json)


def _readable_as_any_file(path: Path) -> None:
    """The mode a plain `open()` would have given (safetensors writes 0600): readable by the group that
    shares the data folder."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def newest_version(folder: str | Path) -> Path:
    """`folder` itself when it holds weights, else its newest subfolder that does (version names are UTC
    timestamps, which sort by time); `folder` when there is none."""
    folder = Path(folder)
    if (folder / WEIGHTS).exists() or (folder / HF_PICKLE_WEIGHTS).exists():
        return folder
    versions = sorted(p.parent for p in folder.glob(f"*/{WEIGHTS}"))
    return versions[-1] if versions else folder


def _read_folder(folder: Path) -> tuple[dict[str, Any], Tensors]:
    """`config.json` and the weights of a checkpoint folder (model.safetensors, else pytorch_model.bin); of a
    folder of versions (a pipeline's model output, Kedro's `versioned: true`), the newest version's."""
    folder = newest_version(folder)
    weights = [folder / name for name in (WEIGHTS, HF_PICKLE_WEIGHTS) if (folder / name).exists()]
    if not weights:
        raise FileNotFoundError(f"no {WEIGHTS} or {HF_PICKLE_WEIGHTS} in {folder}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG} beside the weights in {folder}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG} is not valid JSON: {err}") from err
    return config, _read_file(weights[0])


def _read_file(path: Path) -> Tensors:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error type for truncated or foreign files
            raise ValueError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from err
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return _as_tensors(arrays)
    try:
        return _as_tensors(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as err:
        with path.open("rb") as f:
            head = f.read(2)
        if head in (b"PK", *(bytes([0x80, v]) for v in range(2, 6))):  # torch.save's zip, a pickle
            raise ValueError(
                f"refusing to unpickle {path}: it holds Python objects, not just tensors; "
                "convert it to safetensors, npz or a plain state dict"
            ) from err
        raise ValueError(f"cannot read {path}: not a safetensors, npz or torch weights file") from err
    except (RuntimeError, KeyError, EOFError) as err:  # torch.load's errors for files of other kinds
        raise ValueError(f"cannot read {path}: not a safetensors, npz or torch weights file") from err


def _as_tensors(values: Any) -> Tensors:
    if not isinstance(values, Mapping) or not all(
        isinstance(v, torch.Tensor | np.ndarray) for v in values.values()
    ):
        raise ValueError(
            "expected a flat mapping of parameter names to tensors or arrays (a state dict or npz)"
        )
    return {k: torch.as_tensor(v) for k, v in values.items()}


def _detect_format(tensors: Tensors, folder_config: dict[str, Any] | None) -> str:
    if folder_config is not None:
        if "architecture" in folder_config:  # timm's hub config
            return "timm"
        return "hf" if "model_type" in folder_config else "native"
    if any("/" in k for k in tensors):
        return "big_vision"
    if any(k.startswith(("vit.", "embeddings.")) for k in tensors):
        return "hf"
    if "blocks.0.mlp.fc1.weight" in tensors:
        return "timm"
    raise ValueError(f"cannot tell the format from keys such as {sorted(tensors)[:4]}; pass format=")


def _rename(tensors: Mapping[str, torch.Tensor], table: Sequence[tuple[str, str]]) -> Tensors:
    """Rename each key by the first (source, target) prefix pair that matches it; "{i}" stands for a layer
    index. Keys no pair matches keep their name, so a strict load reports them."""
    patterns = [(re.compile(re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)")), dst) for src, dst in table]
    renamed = {}
    for key, value in tensors.items():
        for pattern, dst in patterns:
            if match := pattern.match(key):
                key = dst.format(**match.groupdict()) + key[match.end() :]
                break
        renamed[key] = value
    return renamed


def _merge_qkv(state: Tensors) -> Tensors:
    """Separate `attn.{q,k,v}.{weight,bias}` → this model's fused `attn.qkv` (q, k, v stacked on dim 0)."""
    merged = {}
    for key, value in state.items():
        if ".attn.q." in key:
            parts = [state[key.replace(".attn.q.", f".attn.{p}.")] for p in "qkv"]
            merged[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
        elif ".attn.k." not in key and ".attn.v." not in key:
            merged[key] = value
    return merged


def _split_qkv(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The inverse of `_merge_qkv`."""
    split = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", value.chunk(3), strict=True):
                split[key.replace(".attn.qkv.", f".attn.{part}.")] = chunk
        else:
            split[key] = value
    return split


def _rows(state: Tensors, key: str) -> int | None:
    return state[key].shape[0] if key in state else None


def _from_hf(tensors: Tensors, hf_config: Mapping[str, Any] | Any) -> tuple[ViTConfig, Tensors]:
    """`transformers` ViTModel / ViTForImageClassification weights (with or without the `vit.` prefix) and
    config → ours. ViTModel's pooler becomes the tanh pre-logits layer; its `layer_norm_eps` (1e-12 by
    default, converted from JAX's 1e-6) is this model's 1e-6, a difference below float32 noise."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
        raise ValueError("only HF ViTs with exact GELU ('gelu') and qkv biases map onto this model")
    renamed = _rename(
        {k.removeprefix("vit."): v for k, v in tensors.items()}, HF_SAVED_NAMES + HF_MODULE_NAMES
    )
    state = _merge_qkv(renamed)
    config = ViTConfig(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        mlp_dim=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"],
        num_classes=_rows(state, "head.weight") or 0,  # 0: the checkpoint has no head
        representation_size=_rows(state, "pre_logits.0.weight"),
        dropout=cfg.get("hidden_dropout_prob", 0.0),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.0),
        in_chans=cfg.get("num_channels", 3),
    )
    return config, state


def _from_timm(tensors: Tensors, num_heads: int | None) -> tuple[ViTConfig, Tensors]:
    """A timm `VisionTransformer` state dict → ours (class token or plain average pooling, learned posemb,
    optional `pre_logits.fc`); timm's hybrid backbones and fc_norm have no counterpart here."""
    if "fc_norm.weight" in tensors:
        raise ValueError(
            "timm's fc_norm (LayerNorm after average pooling) has no counterpart: this model "
            "normalises the tokens before pooling"
        )
    return _from_shapes(_rename(tensors, TIMM_NAMES), num_heads)


def _from_big_vision(params: Tensors) -> tuple[ViTConfig, Tensors]:
    """A vit_jax / big_vision parameter tree flattened with "/" (their `.npz`) → ours, the R50 hybrid included.

    Accepts the "params/", "opt/target/" and "params/img/" roots, vit_jax's pre-linen and big_vision's linen
    layer names, and scanned encoders (`Transformer/encoderblock/...` stacked over depth).
    """
    roots = [k.removesuffix("embedding/kernel") for k in params if k.endswith("embedding/kernel")]
    if not roots:
        raise ValueError("no 'embedding/kernel' among the parameters: not a vit_jax / big_vision ViT")
    params = _unscan({k.removeprefix(roots[0]): v for k, v in params.items() if k.startswith(roots[0])})
    num_heads = next((v.shape[-2] for k, v in params.items() if k.endswith("query/kernel")), None)
    state = _rename({k: _jax_to_torch(k, v) for k, v in params.items()}, BIG_VISION_NAMES)
    state = {re.sub(r"\.(kernel|scale)$", ".weight", k.replace("/", ".")): v for k, v in state.items()}
    return _from_shapes(_merge_qkv(state), num_heads)


def _unscan(params: Tensors) -> Tensors:
    """big_vision's scanned encoder (`Transformer/encoderblock/...`, [depth, ...]) → `encoderblock_{i}`."""
    out = {}
    for key, value in params.items():
        if key.startswith("Transformer/encoderblock/"):
            out.update({key.replace("encoderblock/", f"encoderblock_{i}/"): v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def _jax_to_torch(name: str, value: torch.Tensor) -> torch.Tensor:
    """One Flax parameter in torch's layout: conv kernels HWIO → OIHW, Dense kernels [in, out] → [out, in],
    attention q/k/v kernels [D, heads, head_dim] and out kernels [heads, head_dim, D] → [D, D] Linear weights,
    biases and scales flat (vit_jax stores some GroupNorm scales as [1, 1, 1, C])."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("bias", "scale"):
        return value.reshape(-1)
    if leaf != "kernel":
        return value
    if value.ndim == 4:
        return value.permute(3, 2, 0, 1)
    if name.endswith("out/kernel"):
        return value.flatten(0, 1).T
    return value.flatten(1).T


def _from_shapes(state: Tensors, num_heads: int | None) -> tuple[ViTConfig, Tensors]:
    """The `ViTConfig` of our-named tensors from their shapes (timm and npz checkpoints carry no config).

    `num_heads=None` (timm records none) takes Table 1's count for the width. A posemb without the class
    token's slot (big_vision, timm's no_embed_class) gets a zero one: it adds nothing, as in those models.
    """
    needed = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.0.weight"]
    if missing := [k for k in needed if k not in state]:
        raise ValueError(f"not a ViT checkpoint this loader knows: no {missing} after renaming")
    proj = state["patch_embed.proj.weight"]
    if num_heads is None:
        if proj.shape[0] not in HEADS_BY_WIDTH:
            raise ValueError(
                f"the weights do not record the head count and width {proj.shape[0]} is not in "
                "Table 1: pass num_heads="
            )
        num_heads = HEADS_BY_WIDTH[proj.shape[0]]
        log.warning(
            "assuming Table 1's %d heads for width %d; pass num_heads= otherwise", num_heads, proj.shape[0]
        )
    prefix = int("cls_token" in state)
    tokens = state["pos_embed"].shape[1]
    if prefix and math.isqrt(tokens) ** 2 == tokens:
        state = {**state, "pos_embed": F.pad(state["pos_embed"], (0, 0, 1, 0))}
        tokens += 1
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ValueError(f"{tokens - prefix} position embeddings do not form a square grid")
    hybrid, stride = _resnet_stem(state)
    patch = (proj.shape[2] * stride, proj.shape[3] * stride)
    config = ViTConfig(
        image_size=(side * patch[0], side * patch[1]),
        patch_size=patch,
        width=proj.shape[0],
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        mlp_dim=state["blocks.0.mlp.0.weight"].shape[0],
        num_heads=num_heads,
        num_classes=_rows(state, "head.weight") or 0,  # 0: the checkpoint has no head
        pool="tok" if prefix else "gap",
        representation_size=_rows(state, "pre_logits.0.weight"),
        hybrid=hybrid,
        in_chans=state.get("patch_embed.stem.conv_root.weight", proj).shape[1],
    )
    return config, state


def _resnet_stem(state: Tensors) -> tuple[str | None, int]:
    """The hybrid stem's name in RESNET_LAYERS, from its units per stage, and its stride; (None, 1) if none."""
    units = {m.groups() for k in state if (m := re.match(r"patch_embed\.stem\.block(\d+)\.unit(\d+)\.", k))}
    if not units:
        return None, 1
    per_stage = Counter(int(stage) for stage, _ in units)
    layers = tuple(per_stage[stage] for stage in sorted(per_stage))
    names = [name for name, known in RESNET_LAYERS.items() if known == layers]
    if not names:
        raise ValueError(f"a hybrid ResNet with {layers} units per stage is none of {RESNET_LAYERS}")
    with torch.device("meta"):  # only the stride is needed
        return names[0], resnet_stem_from_name(names[0]).reduction


def reconcile(
    config: ViTConfig,
    state: Tensors,
    image_size: int | tuple[int, int] | None,
    num_classes: int | None,
    resize_method: str,
    features_only: bool = False,
) -> VisionTransformer:
    """vit_jax's surgery on a `config` and its `state` dict: posemb resized to `image_size`, head replaced for
    `num_classes` (a `config` with `num_classes` 0 has none); then a strict load. The last step of
    `load_pretrained`, and `surgery.for_finetuning`'s for a model in memory."""
    if image_size is not None:
        target = config.replace(image_size=image_size)
        state = _resize_posemb(state, config, target.grid_size, resize_method)
        config = target
    if num_classes is None and config.num_classes == 0:
        if not features_only:
            raise ValueError(
                "the checkpoint has no classification head: pass num_classes (the task's classes), or "
                "features_only=True to use its features alone"
            )
        num_classes = 0  # an empty head
    new_head = num_classes is not None and (num_classes != config.num_classes or num_classes == 0)
    if new_head:
        config = config.replace(num_classes=num_classes, representation_size=None)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "pre_logits."))}
    model = VisionTransformer(config)
    if new_head:  # the fresh model's head: zero kernel, bias head_bias_init
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the checkpoint does not fit the model it describes ({config}): its weights and its config "
            f"disagree; use the config it was trained with (format=, hf_config=, or its own config.json):\n{err}"
        ) from err
    return model.eval()


def _resize_posemb(state: Tensors, config: ViTConfig, grid: tuple[int, int], method: str) -> Tensors:
    """The learned posemb of `state` from `config.grid_size` to `grid`. "learn2d"'s row and column tables are
    resized on their own, which equals resizing their full grid (it is separable)."""
    old = config.grid_size
    if grid == old:
        return state
    state = dict(state)
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, config.num_prefix_tokens, old, method)
    if "pos_embed_2d.row" in state:
        row, col = state["pos_embed_2d.row"].flatten(1, 2), state["pos_embed_2d.col"].flatten(1, 2)
        state["pos_embed_2d.row"] = resize_pos_embed(row, (grid[0], 1), 0, (old[0], 1), method)[:, :, None]
        state["pos_embed_2d.col"] = resize_pos_embed(col, (1, grid[1]), 0, (1, old[1]), method)[:, None]
    return state


def _hf_size(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)
