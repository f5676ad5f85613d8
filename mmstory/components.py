"""The model's parts: encoders around pretrained backbones, the bridge and the contrastive heads (CoCa's small
caption decoder is `mmstory.caption_decoder`)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """ImageNet-1k's class names, read once per process: timm parses its files in about 20 ms, and captioning asks for
    them on every call."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(tuple(name.strip() for name in info.index_to_description(i).split(",")) for i in range(1000))


class VisionEncoder(nn.Module):
    """A timm CNN/ViT or an open_clip visual tower, seen as spatial tokens [B, N, D] plus a pooled vector [B, Dp]."""

    def __init__(self, model: nn.Module, info: dict):
        super().__init__()
        self.model = model
        self.kind = info["kind"]
        self.image_size = int(info["image_size"])
        self.mean = list(info["mean"])
        self.std = list(info["std"])
        with torch.no_grad():
            was_training = model.training
            model.eval()
            tokens, pooled = self(torch.zeros(1, 3, self.image_size, self.image_size))
            model.train(was_training)
        self.num_tokens, self.token_dim = tokens.shape[1], tokens.shape[2]
        self.pooled_dim = pooled.shape[1]

    def _classifier(self) -> nn.Linear:
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        if not isinstance(head, nn.Linear) or head.in_features != self.pooled_dim:
            raise ValueError(f"this {self.kind} vision encoder has no linear classifier on its pooled features")
        return head

    def class_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The backbone's own ImageNet classifier on the pooled vector (timm CNNs: avg pool -> linear head)."""
        head = self._classifier()
        return head(pooled.to(head.weight.dtype))

    def class_names(self) -> list[str]:
        """Names of the classifier's classes (ImageNet-1k: the first synonym of each, e.g. 'Egyptian cat')."""
        return [synonyms[0] for synonyms in self.class_synonyms()]

    def class_synonyms(self) -> list[list[str]]:
        """Every name of each class, most common first (ImageNet-1k's WordNet lemmas, e.g. ['tabby', 'tabby cat'])."""
        classes = self._classifier().out_features
        if classes != 1000:
            raise ValueError(f"class names are known for ImageNet-1k's 1000 classes; this head has {classes}")
        return [list(names) for names in _imagenet_synonyms()]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "open_clip":
            pooled, tokens = self.model(pixel_values)
            return tokens, pooled
        features = self.model.forward_features(pixel_values)
        if features.ndim == 4:  # CNN: [B, C, H, W] -> H*W tokens, global average pool
            tokens = features.flatten(2).transpose(1, 2)
            return tokens, tokens.mean(dim=1)
        pooled = self.model.forward_head(features, pre_logits=True)  # ViT: class token or average, as timm pools
        return features[:, getattr(self.model, "num_prefix_tokens", 0):], pooled


class TextEncoder(nn.Module):
    """A Hugging Face encoder whose sentence embedding is the attention-masked mean of its last hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim = model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class ResamplerBridge(nn.Module):
    """Learned queries cross-attend to the image tokens (Flamingo's Perceiver resampler) -> K prefix embeddings."""

    def __init__(self, token_dim: int, num_tokens: int, out_dim: int, num_queries: int, width: int, depth: int,
                 heads: int, dropout: float = 0.0):
        super().__init__()
        self.input_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        self.position = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(width, heads, dropout) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        context = self.input_proj(tokens)
        if context.shape[1] == self.position.shape[1]:
            context = context + self.position
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, context)
        return self.output(queries)


class _ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = torch.cat([self.norm_kv(context), q], dim=1)  # queries also see each other, as in Flamingo
        queries = queries + self.attention(q, kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class GroupedLinear(nn.Module):
    """`groups` independent linear maps, one per slice of the input: [B, groups*in] -> [B, groups*out].

    The weight is stacked [groups*out, in] so that one group is exactly `nn.Linear` (same layout, same
    initialisation draws); no torch layer groups a linear map without a convolution's extra axis.
    """

    def __init__(self, in_dim: int, out_dim: int, groups: int = 1):
        super().__init__()
        self.groups, self.in_dim, self.out_dim = groups, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(groups * out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(groups * out_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        nn.init.uniform_(self.bias, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        x = x.unflatten(-1, (self.groups, self.in_dim))
        out = torch.einsum("...gi,goi->...go", x, self.weight.view(self.groups, self.out_dim, self.in_dim))
        return out.flatten(-2) + self.bias


class ProjectionHead(nn.Module):
    """A linear map into the shared image-text space, plus (hidden > 0) a residual MLP beside it.

    On a frozen encoder's pooled features a linear head is all CLIP-style training can adapt; the MLP lets the head
    re-weight what the frozen features mix, which on the text side retrieves better (the numbers are in docs/).
    `groups` > 1 stacks that many independent heads side by side ([B, groups*out]); they share only the MLP's input
    LayerNorm (see `StoryModel.contrastive_heads`).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.1, groups: int = 1):
        super().__init__()
        self.linear = nn.Linear(in_dim, groups * out_dim, bias=False)
        self.mlp = None
        if hidden > 0:
            self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, groups * hidden), nn.GELU(),
                                     nn.Dropout(dropout), GroupedLinear(hidden, out_dim, groups))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        return out if self.mlp is None else out + self.mlp(features)


class MLPBridge(nn.Module):
    """ClipCap's mapping network: the pooled image vector -> K prefix embeddings through an MLP."""

    def __init__(self, pooled_dim: int, out_dim: int, num_queries: int, width: int):
        super().__init__()
        self.num_queries, self.out_dim = num_queries, out_dim
        self.mlp = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, width * 2), nn.GELU(),
                                 nn.Linear(width * 2, num_queries * out_dim))

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled).view(pooled.shape[0], self.num_queries, self.out_dim)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Agreement of every row of `a` with every row of `b` ([len(a), len(b)]), both in the shared space: each is the
    mean of the contrastive heads' cosines (StoryModel's embeddings are unit vectors scaled so). The one definition
    behind caption and story reranking, retrieval, story evaluation and the SCST retrieval reward."""
    return a @ b.T
