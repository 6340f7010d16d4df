"""Token-shaped layers: a Linear on ``[B, T.., C]`` is a candidate (costs, tracing, attention modules,
torch engines' gradients), on the ViT-style factories and a tiny HuggingFace BertModel."""

import copy

import numpy as np
import pytest
import torch
from model_factories import tiny_bert, vit, vit_mha
from torch import nn

from edge_trady.core.layers import LayerCost
from edge_trady.core.masks import channel_mask
from edge_trady.core.selection import Selection
from edge_trady.engines.torch_masked import TorchMaskedEngine
from edge_trady.engines.torch_sparse import TorchSparseEngine
from edge_trady.errors import EdgeTradyError
from edge_trady.workstation.attention import SplitMultiheadAttention, merged_state, split_multihead_attention
from edge_trady.workstation.cost_trace import norm_pairs, trace_layers
from edge_trady.workstation.example_input import ImageInput, TokenInput, as_example
from edge_trady.workstation.models import classifier_name

TOKENS = TokenInput(16)


def _images(seed: int, n: int = 6, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, classes, n)


def _tokens(seed: int, n: int = 6, classes: int = 4) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Token ids of a 100-word vocabulary, each sequence padded after a random length (mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (n, TOKENS.max_tokens))
    lengths = rng.integers(4, TOKENS.max_tokens + 1, n)
    mask = (np.arange(TOKENS.max_tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return (ids * mask, mask), rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert(4)


def test_a_linear_on_tokens_costs_its_outputs_and_its_tokens() -> None:
    """By hand: ViT at 32 px with 8 px patches has 16 patches + the class token = 17 tokens of 32
    features; fc1 maps 32 -> 64. Cw = C_out, Ca = T per sample, bytes = 4 (C_out + B T)."""
    torch.manual_seed(0)
    layers = {layer.name: layer for layer in trace_layers(vit(4), 32)}
    query, fc1, fc2, head = (layers[n] for n in ("blocks.0.attn.query", "blocks.0.fc1", "blocks.0.fc2", "head"))
    assert (query.kind, query.in_channels, query.out_channels, query.in_hw, query.out_hw) == (
        "linear", 32, 32, (17, 1), (17, 1),
    )  # fmt: skip
    assert (query.weight_units_per_channel, query.act_units_per_channel, query.unit_cost) == (32, 17, 49)
    assert (fc1.weight_units_per_channel, fc1.act_units_per_channel, fc1.unit_cost) == (64, 17, 81)
    assert (fc2.in_channels, fc2.unit_cost, fc2.total_units) == (64, 32 + 17, 64 * 49)
    assert fc1.bytes_per_channel(8) == 4 * (64 + 8 * 17)
    assert fc1.wgrad_macs_per_channel == 64 * 17  # one sample: C_out x T multiply-adds
    assert fc1.weight_shape == (64, 32) and fc1.patch_bytes_per_channel(8) == 0
    assert (head.in_hw, head.unit_cost) == ((1, 1), 4 + 1)  # the class token only: [B, C]
    assert layers["patch"].kind == "conv" and layers["patch"].in_hw == (32, 32)  # convs unchanged
    assert LayerCost.from_dict(fc1.to_dict()) == fc1


def test_any_number_of_leading_axes_makes_tokens() -> None:
    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(3, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, H, W, 3] -> tokens
            return self.head(self.mix(x.permute(0, 2, 3, 1)).mean((1, 2)))

    mix = trace_layers(Grid(), 16)[0]
    assert (mix.in_hw, mix.act_units_per_channel, mix.weight_units_per_channel) == ((256, 1), 256, 5)


def test_bert_layers_see_the_tokens_and_embeddings_stay_frozen(bert) -> None:
    layers = trace_layers(bert, TOKENS)
    names = [layer.name for layer in layers]
    block = "bert.encoder.layer.0."
    assert names[:6] == [
        block + "attention.self.query",
        block + "attention.self.key",
        block + "attention.self.value",
        block + "attention.output.dense",
        block + "intermediate.dense",
        block + "output.dense",
    ]
    assert len(names) == 13 and names[-1] == "classifier" == classifier_name(bert)
    assert all(layer.in_hw == (16, 1) and layer.kind == "linear" for layer in layers[:-1])
    assert layers[4].unit_cost == 64 + 16 and layers[5].unit_cost == 32 + 16
    assert not any("embeddings" in name or "LayerNorm" in name for name in names)


def test_norm_pairs_give_each_linear_the_layernorm_it_reads(bert) -> None:
    torch.manual_seed(0)
    pairs = norm_pairs(vit(4), 32)
    assert pairs["blocks.0.attn.query"] == pairs["blocks.0.attn.value"] == "blocks.0.norm1"
    assert pairs["blocks.1.fc1"] == "blocks.1.norm2" and "blocks.0.fc2" not in pairs
    bert_pairs = norm_pairs(bert, TOKENS)  # post-norm: a block's last LayerNorm feeds the next block
    assert bert_pairs["bert.encoder.layer.1.attention.self.key"] == "bert.encoder.layer.0.output.LayerNorm"
    assert bert_pairs["bert.encoder.layer.0.attention.self.query"] == "bert.embeddings.LayerNorm"


def test_example_inputs() -> None:
    assert as_example(24) == ImageInput(24) and as_example(TOKENS) is TOKENS
    ids, mask = TOKENS.arrays(3)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == mask.dtype == np.int64 and mask.all()
    assert TOKENS.bytes_per_sample == 256 and ImageInput(8).bytes_per_sample == 3 * 64 * 4
    with pytest.raises(TypeError):
        as_example("32")


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_multihead_attention_computes_what_nn_multiheadattention_does(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    split = SplitMultiheadAttention(mha).eval()
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    float_mask = torch.randn(5, 5)
    with torch.no_grad():
        for kwargs in (
            {},
            {"key_padding_mask": padding},
            {"attn_mask": causal, "need_weights": False},
            {"attn_mask": float_mask, "key_padding_mask": padding, "average_attn_weights": False},
        ):
            expected, expected_weights = mha(x, x, x, **kwargs)
            got, weights = split(x, x, x, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            if expected_weights is None:
                assert weights is None
            else:
                torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
        unbatched = x[0] if batch_first else x[:, 0]
        torch.testing.assert_close(split(unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0])


def test_split_attention_with_other_key_and_value_sizes_and_the_packed_names_back() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True).eval()
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 7, 6), torch.randn(2, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(SplitMultiheadAttention(mha)(q, k, v)[0], mha(q, k, v)[0])
    packed = nn.Sequential(nn.MultiheadAttention(8, 2))
    model = copy.deepcopy(packed)
    assert split_multihead_attention(model) == 1
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == [
        "0.q_proj", "0.k_proj", "0.v_proj", "0.out_proj",
    ]  # fmt: skip
    merged = merged_state(model.state_dict())
    assert merged.keys() == packed.state_dict().keys()
    for key, value in packed.state_dict().items():
        assert torch.equal(merged[key], value), key


def test_attention_that_cannot_be_split_is_refused() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(EdgeTradyError, match="0: nn.MultiheadAttention with add_bias_kv or add_zero_attn"):
        split_multihead_attention(model)


def test_weight_sharing_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mix(self.mix(x.mean((2, 3)))))

    with pytest.raises(EdgeTradyError, match="'mix' is called twice in one forward pass"):
        trace_layers(Twice(), 16)

    class Tied(Twice):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.Linear(3, 3)
            self.other.weight = self.mix.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.other(self.mix(x.mean((2, 3)))))

    with pytest.raises(EdgeTradyError, match="layers 'mix' and 'other' share one weight"):
        trace_layers(Tied(), 16)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _selection(layers: list[LayerCost], seed: int) -> Selection:
    """About a third of the input channels of every token-shaped Linear (the head excluded)."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for layer in layers[:-1]:
        if layer.kind == "linear":
            chosen[layer.name] = np.sort(rng.choice(layer.in_channels, layer.in_channels // 3, replace=False))
    return Selection(0, chosen, 0.0)


CASES = {
    "vit": (lambda: vit(4), 32, _images),
    "vit-mha": (lambda: vit_mha(4), 32, _images),
    "vit-mean": (lambda: vit(4, pooling="mean", gelu="tanh"), 32, _images),
    "bert": (lambda: tiny_bert(4), TOKENS, _tokens),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_gradients_of_token_linears_equal_autograd(case: str) -> None:
    """torch-sparse's gradient of every selected entry equals autograd's full gradient (relative
    error <= 1e-5); after a step, every unselected entry is bit-identical."""
    make, example, batch = CASES[case]
    torch.manual_seed(0)
    model = make()
    split_multihead_attention(model)
    layers = trace_layers(model, example)
    head = classifier_name(model)
    selection = _selection(layers, 1)
    x, y = batch(2)
    masked = TorchMaskedEngine(model, layers, head)
    masked.set_selection(Selection(0, {c.name: np.arange(c.in_channels) for c in layers[:-1]}, 0.0))
    _, _, reference = masked.gradients(x, y)
    sparse = TorchSparseEngine(copy.deepcopy(model), layers, head)
    sparse.set_selection(selection)
    grads = sparse.gradients(x, y)
    assert set(grads) == {f"{n}.weight" for n in selection.channels} | {f"{head}.weight", f"{head}.bias"}
    for name, channels in selection.channels.items():
        expected = reference[name][:, channels]
        assert expected.norm() > 0, name
        assert _relative_error(grads[f"{name}.weight"], expected) <= 1e-5, name
    assert _relative_error(grads[f"{head}.weight"], reference[head]) <= 1e-5

    before = {k: v.clone() for k, v in sparse.model.state_dict().items()}
    sparse.train_step(x, y, 0.1)
    after = sparse.model.state_dict()
    by_name = {layer.name: layer for layer in layers}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in selection.channels} | {f"{head}.weight", f"{head}.bias"}
    for name, channels in selection.channels.items():
        mask = torch.from_numpy(channel_mask(by_name[name], channels)).expand_as(before[f"{name}.weight"]) == 1
        assert torch.equal(before[f"{name}.weight"][~mask], after[f"{name}.weight"][~mask])
        assert not torch.equal(before[f"{name}.weight"][mask], after[f"{name}.weight"][mask])


def test_sparse_keeps_only_the_selected_features_of_every_token() -> None:
    torch.manual_seed(0)
    model = vit(4)
    layers = trace_layers(model, 32)
    selection = _selection(layers, 3)
    sparse = TorchSparseEngine(model, layers, "head")
    sparse.set_selection(selection)
    x, y = _images(0)
    saved = sparse.saved_bytes(x, y)
    by_name = {layer.name: layer for layer in layers}
    kept = sum(len(c) * by_name[n].act_units_per_channel for n, c in selection.channels.items())
    assert saved["selected"] == len(x) * kept * 4  # x[..., S] of 17 tokens per sample
    assert saved["weight_grads"] == 4 * sum(len(c) * by_name[n].out_channels for n, c in selection.channels.items())


def test_layernorm_shifts_train_alike_in_both_engines_and_keep_nothing(bert) -> None:
    layers = trace_layers(bert, TOKENS)
    pairs = norm_pairs(bert, TOKENS)
    top = "bert.encoder.layer.1.intermediate.dense"  # the top block only: nothing below needs gradients
    shifts = [pairs[top]]
    selection = Selection(0, {top: np.array([0, 5, 9])}, 0.0)
    masked = TorchMaskedEngine(copy.deepcopy(bert), layers, "classifier", train_shifts=shifts)
    sparse = TorchSparseEngine(copy.deepcopy(bert), layers, "classifier", train_shifts=shifts)
    for engine in (masked, sparse):
        engine.set_selection(selection)
    x, y = _tokens(4)
    _, _, reference = masked.gradients(x, y)
    grads = sparse.gradients(x, y)
    assert _relative_error(grads[f"{shifts[0]}.bias"], reference[f"{shifts[0]}.bias"]) <= 1e-5
    with_shift = sparse.saved_bytes(x, y)
    without = TorchSparseEngine(copy.deepcopy(bert), layers, "classifier")
    without.set_selection(selection)
    assert with_shift["total"] == without.saved_bytes(x, y)["total"]  # the shift keeps nothing more
    before = {k: v.clone() for k, v in sparse.model.state_dict().items()}
    for engine in (masked, sparse):
        engine.train_step(x, y, 0.1)
    after = sparse.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{top}.weight", f"{shifts[0]}.bias", "classifier.weight", "classifier.bias"}
    for key in changed:
        torch.testing.assert_close(after[key], masked.model.state_dict()[key], rtol=1e-5, atol=1e-7)


def test_a_torch_transformer_encoder_is_split_and_traced() -> None:
    """nn.TransformerEncoder's fused fast paths (nested tensors, the fused layer) are turned off, so
    the split modules run: same outputs on the real tokens, 6 Linears per layer on 5 tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2)).eval()
    x, padding = torch.randn(3, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        expected = model[0](x, src_key_padding_mask=padding)
        assert split_multihead_attention(model) == 2
        got = model[0](x, src_key_padding_mask=padding)
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-5, atol=1e-5)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = model, nn.Linear(16, 2)

        def forward(self, images: torch.Tensor) -> torch.Tensor:  # the first 80 values: 5 tokens of 16
            tokens = images.flatten(1)[:, :80].reshape(-1, 5, 16)
            return self.head(self.encoder(tokens).mean(1))

    layers = trace_layers(Encoder(), 16)
    assert [layer.name.split(".")[-1] for layer in layers[:6]] == [
        "q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2",
    ]  # fmt: skip
    assert len(layers) == 13 and all(layer.tokens == 5 for layer in layers[:-1])
