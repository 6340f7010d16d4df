"""Convolutions (the conv / gemm family with ``linear.py``): forward corrections, input and weight
gradients; average pooling.

Tensors are named as in ``step_graph``: ``S`` a layer's selected input channels (``n`` of them),
``x_S`` the kept channels as ``[n, B, H, W]``, ``gy`` the gradient of the conv's output
``[B, C', H', W']``. The *patches* of ``x_S`` are its padded values at every kernel offset ``q``,
strided like the conv: ``[n, B, kh*kw, H', W']``, one ``Conv`` with a constant one-hot kernel over
``x_S`` seen as ``n*B`` one-channel images (exact: each output is one input value).

Dense conv (``group = 1``): its weight is a graph input; input gradient ``ConvTranspose(gy, W)``;
weight gradient ``Einsum(gy, patches(x_S))``.

Grouped / depthwise conv: ONNX Runtime's fast (NCHWc) grouped kernels need a constant weight, and
with a weight fed as an input a depthwise conv is 5-20x slower, so the weight ``W_e`` is a
*refreshed* initializer: the runner writes the current weight into the graph whenever it creates
the session (after each epoch's updates). Within the session only the selected slice changes; the
graph takes its current value ``V`` and adds what ``Δ = V - W_e[slice]`` contributes, on the ``n``
selected channels only:

- forward: ``y = Conv(x, W_e) + scatter_add(Σ_q patches(x_S) * Δ)`` at the slice's output channels;
- input gradient: the input gradient with ``W_e`` + ``Σ_q spread_q(gy at those outputs) * Δ_q``,
  scattered into channels S, where ``spread`` is the transposed conv with a one-hot kernel (a
  stride-1 ``Conv`` with the flipped one-hot kernel after spreading ``gy`` by the stride);
- weight gradient (of ``V``): ``Σ gy[outputs of S] * patches(x_S)`` by Mul + ReduceSum (ONNX
  Runtime's Einsum crashes with SIGFPE when a dimension shared by both operands and the output,
  here ``n``, is empty).

A trained conv followed by a frozen BatchNorm (the forward's constant per-channel affine
``y * s + t``, ``forward.ConstantAffine``) is folded (``fold_affines``): the step runs
``Conv(x, W * s, bias t)`` (a weight-size ``Mul``; ONNX Runtime folds it for a refreshed weight) and
multiplies the weight gradient by ``s``, which is the gradient of the raw ``W``; the activation-size
``Mul`` and ``Add`` of the forward and the ``Mul`` of their backward are gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ....errors import ArtifactError
from .base import CONV_GEMM, SELECTED, Keep, node_attr, rule

TRANSPOSE_FROM = 16 * 16  # input pixels from which a strided grouped conv's input gradient is a ConvTranspose
_FLOAT_ZERO = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])

SLICE_DIFFERENCE = Keep(
    "slice differences",
    "a grouped candidate's selected weights minus the refreshed ones",
    32,
    "n x C'/g x kh x kw once (not per sample)",
)


@dataclass
class Geometry:
    """A 2-D convolution's hyper-parameters and spatial sizes."""

    kernel: list[int]
    strides: list[int]
    pads: list[int]  # top, left, bottom, right
    dilations: list[int]
    group: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def plain(self) -> bool:
        """1x1, stride 1, no padding: the patches are the input itself."""
        return self.kernel == [1, 1] and self.strides == [1, 1] and not any(self.pads)

    def output_padding(self) -> list[int]:
        """Rows / columns of the input the conv's last window does not reach (floor division)."""
        return [
            self.in_hw[i]
            - (
                (self.out_hw[i] - 1) * self.strides[i]
                - self.pads[i]
                - self.pads[i + 2]
                + self.dilations[i] * (self.kernel[i] - 1)
                + 1
            )
            for i in range(2)
        ]

    def transpose_attrs(self) -> dict:
        """ConvTranspose attributes that map the output gradient back onto the input's size."""
        return {
            "kernel_shape": self.kernel,
            "strides": self.strides,
            "pads": self.pads,
            "dilations": self.dilations,
            "group": self.group,
            "output_padding": self.output_padding(),
        }

    def flipped_pads(self) -> list[int]:
        """Pads of the stride-1 correlation of the (stride-spread) output gradient with the flipped
        kernel that gives the input gradient."""
        span = [self.dilations[i] * (self.kernel[i] - 1) for i in range(2)]
        extra = self.output_padding()
        top, left, bottom, right = self.pads
        return [span[0] - top, span[1] - left, span[0] - bottom + extra[0], span[1] - right + extra[1]]


class ConvRules:
    """Mixin of ``StepBuilder``: the Conv and AveragePool rules (uses its emitter and state)."""

    def _geometry(self, node: onnx.NodeProto, kernel: list[int], group: int) -> Geometry:
        if len(kernel) != 2:
            raise ArtifactError(f"{node.name}: only 2-D convolutions and pooling can be differentiated")
        strides = list(node_attr(node, "strides", [1, 1]))
        dilations = list(node_attr(node, "dilations", [1, 1]))
        in_hw = tuple(self._info(node.input[0]).shape[2:])
        auto_pad = node_attr(node, "auto_pad", b"NOTSET")
        if auto_pad in (b"SAME_UPPER", b"SAME_LOWER"):  # the explicit pads it stands for
            total = [
                max((-(-in_hw[i] // strides[i]) - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - in_hw[i], 0)
                for i in range(2)
            ]
            first = [t // 2 if auto_pad == b"SAME_UPPER" else t - t // 2 for t in total]
            pads = [*first, *(t - f for t, f in zip(total, first, strict=True))]
        else:
            pads = [0, 0, 0, 0] if auto_pad == b"VALID" else list(node_attr(node, "pads", [0, 0, 0, 0]))
        return Geometry(kernel, strides, pads, dilations, group, in_hw, tuple(self._info(node.output[0]).shape[2:]))

    def _conv_geometry(self, node: onnx.NodeProto) -> Geometry:
        shape = self.constants[node.input[1]].shape
        return self._geometry(node, list(node_attr(node, "kernel_shape", shape[2:])), node_attr(node, "group", 1))

    # ------------------------------------------------------------------- index vectors of S

    def _group_index(self, layer: str) -> dict[str, str]:
        """int64 index tensors of a grouped layer's slice (emitted once, in the forward):
        ``outputs`` [n * C'/g] the output channels of the slice's rows, ``flat`` [n, C'/g] their
        rows in the weight seen as ``[C' * C/g, kh, kw]``."""
        if layer in self.group_index:
            return self.group_index[layer]
        e, hint = self.emit, f"{layer}/index"
        cost = self.candidates[layer]
        per_group, outs = cost.in_channels // cost.groups, cost.out_channels // cost.groups
        channels = self.channel_inputs[layer]
        group = e.op("Div", [channels, e.ints([per_group], hint)], hint)
        column = e.op("Mod", [channels, e.ints([per_group], hint)], hint)
        first = e.op("Mul", [e.op("Unsqueeze", [group, e.ints([1], hint)], hint), e.ints([outs], hint)], hint)
        rows = e.op("Add", [first, e.const(np.arange(outs, dtype=np.int64)[None, :], hint)], hint)  # [n, outs]
        flat = e.op(
            "Add",
            [
                e.op("Mul", [rows, e.ints([per_group], hint)], hint),
                e.op("Unsqueeze", [column, e.ints([1], hint)], hint),
            ],
            hint,
        )
        index = {"outputs": e.op("Reshape", [rows, e.ints([-1], hint)], hint), "flat": flat}
        self.group_index[layer] = index
        return index

    # ------------------------------------------------------------------------ patches

    def _patches(self, kept: str, geo: Geometry, hint: str, gate: str | None = None) -> str:
        """Patches of ``kept`` ([n, B, H, W]): [n, B, kh*kw, H', W'] (computed once ``gate`` exists)."""
        e = self.emit
        if gate is not None:
            kept = self._after(kept, gate, hint)
        if geo.plain:  # a view, no copy
            return e.op("Unsqueeze", [kept, e.ints([2], hint)], hint)
        images = e.op("Reshape", [kept, e.ints([-1, 1, *geo.in_hw], hint)], hint)  # [n * B, 1, H, W]
        attrs = {"strides": geo.strides, "pads": geo.pads, "dilations": geo.dilations, "kernel_shape": geo.kernel}
        patches = e.op("Conv", [images, e.const(_one_hot(geo.kernel), hint)], hint, **attrs)
        return self._unflatten(patches, kept, 2, [geo.kernel[0] * geo.kernel[1], *geo.out_hw], hint)

    def _transposed_patches(self, picked: str, geo: Geometry, hint: str) -> str:
        """``picked`` ([n, outs, B, H', W']) spread back by the transposed conv at every kernel
        offset: [n, outs, B, kh*kw, H, W]. A stride-1 correlation with the flipped one-hot kernel
        (after spreading by the stride), 2-16x faster in ORT than ConvTranspose."""
        e = self.emit
        images = e.op("Reshape", [picked, e.ints([-1, 1, *geo.out_hw], hint)], hint)  # [n * outs * B, 1, H', W']
        pads = geo.flipped_pads()
        one_hot = _one_hot(geo.kernel)
        if min(pads) >= 0:
            attrs = {"pads": pads, "dilations": geo.dilations, "kernel_shape": geo.kernel}
            kernel = e.const(np.ascontiguousarray(one_hot[:, :, ::-1, ::-1]), hint)
            if geo.strides != [1, 1]:
                images = self._interleave_zeros(images, geo, hint)
            spread = e.op("Conv", [images, kernel], hint, **attrs)
        else:
            kernel = e.const(one_hot.transpose(1, 0, 2, 3).copy(), hint)
            spread = e.op("ConvTranspose", [images, kernel], hint, **{**geo.transpose_attrs(), "group": 1})
        return self._unflatten(spread, picked, 3, [geo.kernel[0] * geo.kernel[1], *geo.in_hw], hint)

    def _unflatten(self, t: str, like: str, leading: int, rest: list[int], hint: str) -> str:
        """``t`` ([N, ...]) as [like's first ``leading`` dims..., *rest] (any of them may be 0)."""
        e = self.emit
        head = e.op("Slice", [e.op("Shape", [like], hint), e.ints([0], hint), e.ints([leading], hint)], hint)
        shape = e.op("Concat", [head, e.ints(rest, hint)], hint, axis=0)
        return e.op("Reshape", [t, shape], hint, allowzero=1)

    def _scatter_add(self, data: str, channels: str, updates: str, hint: str) -> str:
        """``data`` ([B, C, H, W]) with ``updates`` ([B, m, H, W]) added at channels ``channels`` [m]."""
        e = self.emit
        index = e.op("Reshape", [channels, e.ints([1, -1, 1, 1], hint)], hint)
        index = e.op("Expand", [index, e.op("Shape", [updates], hint)], hint)
        return e.op("ScatterElements", [data, index, updates], hint, axis=1, reduction="add")

    # ------------------------------------------------------------------------- forward

    def _candidate_conv(self, node: onnx.NodeProto) -> None:
        """The forward of a candidate conv: its weight (scaled by a folded affine's ``s``) and, for a
        refreshed weight, the selected slice's correction (``_refreshed_conv``)."""
        weight = node.input[1]
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[1] = self._weight_value(weight, f"{node.name}/scaled", gate=node.input[0])
        if weight in self.slice_inputs:
            conv.output[0] = self.emit.fresh(f"{node.name}/refreshed")
            self.emit.nodes.append(conv)
            self._refreshed_conv(node, conv.output[0], node.output[0])
        else:
            self.emit.nodes.append(conv)

    def _weight_value(self, weight: str, hint: str, gate: str | None = None) -> str:
        """What the conv computes with: ``weight``, times a folded affine's scale (``fold_affines``);
        a fed weight is read once ``gate`` exists (see ``_after``) when the scale is applied: in the
        forward its input (else every scaled weight is made at the start and kept until its conv:
        +8.7 MiB live at 128 px), in the backward its output gradient."""
        if weight not in self.scales:
            return weight
        value = weight
        if gate is not None and weight not in self.refreshed:
            value = self._after(weight, gate, hint)
        return self.emit.op("Mul", [value, self.emit.const(self.scales[weight].reshape(-1, 1, 1, 1), hint)], hint)

    def _row_scales(self, layer: str, rank: int) -> str:
        """A grouped layer's folded scale at its slice's rows: [n, C'/g, 1, ...] (``rank`` dims)."""
        e, hint = self.emit, f"{layer}/index"
        outs = self.candidates[layer].out_channels // self.candidates[layer].groups
        scale = e.const(self.scales[f"{layer}.weight"], hint)
        rows = e.op("Gather", [scale, self._group_index(layer)["outputs"]], hint, axis=0)
        return e.op("Reshape", [rows, e.ints([-1, outs] + [1] * (rank - 2), hint)], hint)

    def _refreshed_conv(self, node: onnx.NodeProto, raw: str, y: str) -> None:
        """Forward of a grouped candidate conv whose Conv reads the refreshed ``W_e``: add the
        selected slice's difference (see the module docstring) to ``raw`` and name the sum ``y``."""
        e, weight = self.emit, node.input[1]
        layer = self.layer_of_weight[weight]
        hint = f"{layer}/correction"
        geo = self._conv_geometry(node)
        index = self._group_index(layer)
        kh, kw = geo.kernel
        outs = self.candidates[layer].out_channels // geo.group
        rows = e.op("Reshape", [weight, e.ints([-1, kh, kw], hint)], hint)
        baked = e.op("Gather", [rows, index["flat"]], hint, axis=0)  # [n, outs, kh, kw]
        delta = e.op("Sub", [self.slice_inputs[weight], baked], hint)
        self.deltas[layer] = e.op("Reshape", [delta, e.ints([-1, outs, 1, kh * kw, 1, 1], hint)], hint)
        if weight in self.scales:
            self.deltas[layer] = e.op("Mul", [self.deltas[layer], self._row_scales(layer, 6)], hint)
        why = f"difference of the selected slice of {layer} from the refreshed weight"
        self._record(self.deltas[layer], SLICE_DIFFERENCE, why, 0, fixed=4 * outs * kh * kw, layer=layer)
        patches = self._patches(self.taps[layer], geo, hint)  # [n, B, kk, H', W']
        patches = e.op("Unsqueeze", [patches, e.ints([1], hint)], hint)  # [n, 1, B, kk, H', W']
        product = e.op("Mul", [patches, self.deltas[layer]], hint)
        summed = e.op("ReduceSum", [product, e.ints([3], hint)], hint, keepdims=0)  # [n, outs, B, H', W']
        moved = e.op("Transpose", [summed], hint, perm=[2, 0, 1, 3, 4])  # [B, n, outs, H', W']
        flat = e.op("Reshape", [moved, e.ints([0, -1, *geo.out_hw], hint)], hint)  # [B, n * outs, H', W']
        self._scatter_add(raw, index["outputs"], flat, hint)
        e.nodes[-1].output[0] = y

    # ------------------------------------------------------------------------ backward

    @rule("Conv", family=CONV_GEMM, keeps=(SELECTED, SLICE_DIFFERENCE))
    def _d_conv(self, node: onnx.NodeProto, gy: str) -> None:
        x, weight = node.input[0], node.input[1]
        geo = self._conv_geometry(node)
        layer = self.layer_of_weight.get(weight)
        picked = None
        if layer is not None and geo.group == 1:
            self.weight_grads[weight] = self._scaled_grad(layer, self._dense_weight_grad(layer, gy, geo))
        elif layer is not None:
            picked = self._picked(layer, gy, geo)
            self.weight_grads[weight] = self._scaled_grad(layer, self._grouped_weight_grad(layer, gy, picked, geo))
        if not self._wants(x):
            return
        grad = self._conv_input_grad(node, gy, geo)
        if picked is not None:
            grad = self._scatter_add(
                grad, self.channel_inputs[layer], self._input_correction(layer, picked, geo), f"{layer}/grad_input"
            )
        self._add_grad(x, grad)

    def _scaled_grad(self, layer: str, grad: str) -> str:
        """The gradient of ``layer``'s raw weight from that of its scaled one (``fold_affines``):
        ``grad`` times the scale of each row (``grad`` itself when no affine was folded)."""
        weight = f"{layer}.weight"
        if weight not in self.scales:
            return grad
        hint = f"{layer}/grad_weight"
        if self.candidates[layer].groups == 1:
            factor = self.emit.const(self.scales[weight].reshape(-1, 1, 1, 1), hint)
        else:
            factor = self._row_scales(layer, 4)
        return self.emit.op("Mul", [grad, factor], hint)

    def _conv_input_grad(self, node: onnx.NodeProto, gy: str, geo: Geometry) -> str:
        """A stride-1 correlation of ``gy`` with the flipped kernel, inputs and outputs swapped per
        group (a constant for a frozen or refreshed weight): ORT runs it faster than ConvTranspose.
        A strided dense conv uses ``ConvTranspose(gy, W)``; a strided grouped one too when its input
        has at least ``TRANSPOSE_FROM`` pixels, else it spreads ``gy`` with stride - 1 zeros first
        (measured per shape, EfficientNet-Lite0's strided depthwise layers: ``bench/conv_forms.py``)."""
        e, weight, hint = self.emit, node.input[1], f"{node.name}/grad_input"
        pads = geo.flipped_pads()
        strided = geo.strides != [1, 1]
        large = geo.in_hw[0] * geo.in_hw[1] >= TRANSPOSE_FROM
        if min(pads) < 0 or (strided and (geo.group == 1 or large)):
            return e.op("ConvTranspose", [gy, self._weight_value(weight, hint, gy)], hint, **geo.transpose_attrs())
        if strided:
            gy = self._interleave_zeros(gy, geo, hint)
        attrs = {"group": geo.group, "dilations": geo.dilations, "pads": pads, "kernel_shape": geo.kernel}
        return e.op("Conv", [gy, self._swapped_kernel(weight, geo, gy, hint)], hint, **attrs)

    def _swapped_kernel(self, weight: str, geo: Geometry, gy: str, hint: str) -> str:
        """``W`` [C', C/g, kh, kw] as the kernel of its input gradient: [C, C'/g, kh, kw], flipped
        (computed once ``gy`` exists when ``W`` is a graph input)."""
        e = self.emit
        outputs, per_group, kh, kw = self.constants[weight].shape
        groups, outs = geo.group, outputs // geo.group
        if weight not in self.weights:  # frozen
            swapped = self.constants[weight].reshape(groups, outs, per_group, kh, kw).transpose(0, 2, 1, 3, 4)
            return e.const(np.ascontiguousarray(swapped.reshape(-1, outs, kh, kw)[:, :, ::-1, ::-1]), hint)
        kernel = self._weight_value(weight, hint, gy)  # ORT folds what follows for a refreshed initializer
        if kernel == weight and weight not in self.refreshed:
            kernel = self._after(weight, gy, hint)
        if outs > 1 or per_group > 1:
            grouped = e.op("Reshape", [kernel, e.ints([groups, outs, per_group, kh, kw], hint)], hint)
            swapped = e.op("Transpose", [grouped], hint, perm=[0, 2, 1, 3, 4])
            kernel = e.op("Reshape", [swapped, e.ints([-1, outs, kh, kw], hint)], hint)
        if [kh, kw] != [1, 1]:
            flip = [e.ints([-1, -1], hint), e.ints([-(2**62)] * 2, hint), e.ints([2, 3], hint), e.ints([-1, -1], hint)]
            kernel = e.op("Slice", [kernel, *flip], hint)
        return kernel

    def _interleave_zeros(self, t: str, geo: Geometry, hint: str) -> str:
        """``t`` ([B, C, H', W']) with stride - 1 zeros between its values: [B, C, (H'-1)*s + 1, ...].
        Equal strides: ``t`` and s*s - 1 zero blocks, ``Concat`` + ``DepthToSpace`` (1.7-2x faster
        in ORT than a ``Pad`` of the 6-D view, which the other case uses)."""
        e = self.emit
        (sh, sw), (oh, ow) = geo.strides, geo.out_hw
        if sh == sw:
            zeros = e.op("ConstantOfShape", [e.op("Shape", [t], hint)], hint, value=_FLOAT_ZERO)
            blocks = e.op("Concat", [t] + [zeros] * (sh * sw - 1), hint, axis=1)
            merged = e.op("DepthToSpace", [blocks], hint, blocksize=sh, mode="DCR")
        else:
            spread = e.op("Unsqueeze", [t, e.ints([3, 5], hint)], hint)  # [B, C, H', 1, W', 1]
            spread = e.op("Pad", [spread, e.ints([0] * 6 + [0, 0, 0, sh - 1, 0, sw - 1], hint)], hint)
            merged = e.op("Reshape", [spread, e.ints([0, 0, oh * sh, ow * sw], hint)], hint)
        ends = e.ints([(oh - 1) * sh + 1, (ow - 1) * sw + 1], hint)
        return e.op("Slice", [merged, e.ints([0, 0], hint), ends, e.ints([2, 3], hint)], hint)

    def _dense_weight_grad(self, layer: str, gy: str, geo: Geometry) -> str:
        """[C', n, kh, kw]: ``Einsum(gy, patches(x_S))``."""
        e, hint = self.emit, f"{layer}/grad_weight"
        patches = self._patches(self.taps[layer], geo, hint, gate=gy)  # [n, B, kk, H', W']
        grad = e.op("Einsum", [gy, patches], hint, equation="bohw,sbqhw->osq")
        return e.op("Reshape", [grad, e.ints([self.candidates[layer].out_channels, -1, *geo.kernel], hint)], hint)

    def _picked(self, layer: str, gy: str, geo: Geometry) -> str:
        """``gy`` at the output channels of a grouped layer's slice: [n, C'/g, B, H', W']."""
        e, hint = self.emit, f"{layer}/grad_weight"
        outs = self.candidates[layer].out_channels // geo.group
        picked = e.op("Gather", [gy, self._group_index(layer)["outputs"]], hint, axis=1)  # [B, n * outs, H', W']
        picked = e.op("Reshape", [picked, e.ints([0, -1, outs, *geo.out_hw], hint)], hint)
        return e.op("Transpose", [picked], hint, perm=[1, 2, 0, 3, 4])

    def _grouped_weight_grad(self, layer: str, gy: str, picked: str, geo: Geometry) -> str:
        """[n, C'/g, kh, kw]: ``Σ picked * patches(x_S)`` over B, H', W'."""
        e, hint = self.emit, f"{layer}/grad_weight"
        outs = self.candidates[layer].out_channels // geo.group
        patches = self._patches(self.taps[layer], geo, hint, gate=gy)
        patches = e.op("Unsqueeze", [patches, e.ints([1], hint)], hint)  # [n, 1, B, kk, H', W']
        spread = e.op("Unsqueeze", [picked, e.ints([3], hint)], hint)  # [n, outs, B, 1, H', W']
        product = e.op("Mul", [spread, patches], hint)
        grad = e.op("ReduceSum", [product, e.ints([2, 4, 5], hint)], hint, keepdims=0)
        return e.op("Reshape", [grad, e.ints([-1, outs, *geo.kernel], hint)], hint)

    def _input_correction(self, layer: str, picked: str, geo: Geometry) -> str:
        """The slice difference's part of the input gradient of channels S: [B, n, H, W]."""
        e, hint = self.emit, f"{layer}/grad_input"
        spread = self._transposed_patches(picked, geo, hint)  # [n, outs, B, kk, H, W]
        product = e.op("Mul", [spread, self.deltas[layer]], hint)
        summed = e.op("ReduceSum", [product, e.ints([1, 3], hint)], hint, keepdims=0)  # [n, B, H, W]
        return e.op("Transpose", [summed], hint, perm=[1, 0, 2, 3])

    @rule("AveragePool", family=CONV_GEMM)
    def _d_average_pool(self, node: onnx.NodeProto, gy: str) -> None:
        x = node.input[0]
        if not self._wants(x):
            return
        info = self._info(x)
        channels = info.shape[1]
        geo = self._geometry(node, list(node_attr(node, "kernel_shape")), channels)
        floor = [(geo.in_hw[i] + geo.pads[i] + geo.pads[i + 2] - geo.kernel[i]) // geo.strides[i] + 1 for i in range(2)]
        if list(geo.out_hw) != floor:
            raise ArtifactError(f"{node.name}: average pooling with ceil_mode cannot be differentiated")
        e, hint = self.emit, f"{node.name}/grad"
        if node_attr(node, "count_include_pad", 0) or not any(geo.pads):
            scale = np.float32(1.0 / (geo.kernel[0] * geo.kernel[1]))
        else:  # divide each window by the number of real (unpadded) pixels it covers
            rows = [
                _window_counts(geo.in_hw[i], geo.kernel[i], geo.strides[i], geo.pads[i], geo.pads[i + 2])
                for i in range(2)
            ]
            scale = (1.0 / np.outer(*rows)).astype(np.float32)[None, None]
        scaled = e.op("Mul", [gy, e.const(scale, hint)], hint)
        ones = e.const(np.ones((channels, 1, *geo.kernel), np.float32), hint)
        self._add_grad(x, e.op("ConvTranspose", [scaled, ones], hint, **geo.transpose_attrs()))


def fold_affines(
    graph: onnx.GraphProto, constants: dict[str, np.ndarray], trained: set[str]
) -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    """``graph`` with every ``Conv(x, W) -> Mul(s) -> Add(t)`` whose weight ``W`` is in ``trained``
    and whose ``s`` and ``t`` are per-output-channel constants replaced by one ``Conv(x, W, bias)``
    named as the ``Add`` (``bias = b * s + t``), and the scales ``s`` by weight: the step applies them
    (see the module docstring). ``constants`` gains the biases."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    scales: dict[str, np.ndarray] = {}
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in trained:
            continue
        channels = constants[node.input[1]].shape[0]
        mul = _only_user(node.output[0], users, outputs, "Mul")
        add = mul and _only_user(mul.output[0], users, outputs, "Add")
        scale = mul and _per_channel(mul, node.output[0], constants, channels)
        shift = add and _per_channel(add, mul.output[0], constants, channels)
        if scale is None or shift is None:
            continue
        bias = shift if len(node.input) < 3 or not node.input[2] else constants[node.input[2]] * scale + shift
        name = f"{node.input[1]}/folded_bias"
        constants[name] = bias.astype(np.float32)
        folded = onnx.NodeProto()
        folded.CopyFrom(node)
        del folded.input[2:]
        folded.input.append(name)
        folded.output[0] = add.output[0]
        replaced[id(node)] = folded
        dropped.update((id(mul), id(add)))
        scales[node.input[1]] = scale.astype(np.float32)
    result = onnx.GraphProto()
    result.CopyFrom(graph)
    del result.node[:]
    result.node.extend(replaced.get(id(n), n) for n in graph.node if id(n) not in dropped)
    result.initializer.extend(
        onnx.numpy_helper.from_array(constants[f"{w}/folded_bias"], f"{w}/folded_bias") for w in scales
    )
    return result, scales


def _only_user(name: str, users: dict[str, list[onnx.NodeProto]], outputs: set[str], op: str) -> onnx.NodeProto | None:
    found = users.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op and name not in outputs else None


def _per_channel(node: onnx.NodeProto, data: str, constants: dict[str, np.ndarray], channels: int) -> np.ndarray | None:
    """The other operand of ``node`` as a [channels] vector, if it is a constant per channel of ``data``."""
    other = [i for i in node.input if i != data]
    if len(other) != 1 or other[0] not in constants:
        return None
    value = constants[other[0]]
    if value.ndim not in (3, 4) or value.size != channels or value.shape[-3] != channels:
        return None
    return value.reshape(channels)


def _one_hot(kernel: list[int]) -> np.ndarray:
    """[kh*kw, 1, kh, kw]: output channel ``q`` reads kernel offset ``q`` only."""
    count = kernel[0] * kernel[1]
    return np.eye(count, dtype=np.float32).reshape(count, 1, *kernel)


def _window_counts(size: int, kernel: int, stride: int, begin: int, end: int) -> np.ndarray:
    """Real (unpadded) pixels under each pooling window along one axis."""
    starts = np.arange(0, size + begin + end - kernel + 1, stride) - begin
    return np.minimum(starts + kernel, size) - np.maximum(starts, 0)
