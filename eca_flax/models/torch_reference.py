"""PyTorch reference of the original ECA-Net architectures, written from the facts file.

All of eca_flax's torch code: the reference models (``build``), random weights for parity
tests (``random_reference``, ``randomize``) and state_dicts as numpy. Used by
``convert_torch_weights.py --verify``, the benchmark's ``--torch`` and the tests; nothing else
imports it, so eca_flax itself needs no torch. Module names reproduce the original state_dict
keys: ResNet ``conv1``/``bn1``/``layerS.B.{conv,bn}N``/``layerS.B.eca.conv``/``downsample``/
``fc``, MobileNetV2 ``features.i.conv.j``/``classifier.1``. The SE baseline (``attention="se"``,
ResNets) names its layer ``layerS.B.se`` with Linear ``fc1`` / ``fc2``.

timm's ECA-ResNets (``TimmResNet``, written from timm_eca_facts.md) have timm's keys: the
3x3 stem ``conv1.0``/``.1``/``.3``/``.4``/``.6``, ``bn1``, Bottlenecks with ECA under
``layerS.B.se.conv``, avg-down shortcuts ``downsample.1`` (conv) / ``.2`` (BN), ``fc``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from eca_flax.models import resnet
from eca_flax.models.layers import attention_attribute
from eca_flax.models.registry import (
    TIMM,
    KSize,
    model_attention,
    model_info,
    resnet_layout,
    resolve_k_size,
)


class ECALayer(nn.Module):
    """Original eca_layer: GAP -> Conv1d(1, 1, k, no bias) over channels, sigmoid."""

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class ECANSLayer(nn.Module):
    """Original eca_ns layer: per-channel k taps over neighbouring channels."""

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        self.k_size = k_size
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(channel, channel, kernel_size=k_size, bias=False, groups=channel)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = nn.functional.unfold(
            y.transpose(-1, -3), kernel_size=(1, self.k_size), padding=(0, (self.k_size - 1) // 2)
        )
        y = self.conv(y.transpose(-1, -2)).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class SELayer(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): GAP -> Linear(C, C // 16) -> ReLU -> Linear -> sigmoid.

    Both Linear layers have a bias; their names give the keys ``se.fc1.*`` and ``se.fc2.*``.
    """

    def __init__(self, channel: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channel, channel // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channel // reduction, channel)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = torch.flatten(self.avg_pool(x), 1)
        y = self.sigmoid(self.fc2(self.relu(self.fc1(y))))
        return x * y[:, :, None, None]


def _attention(attention, channels, k):
    if attention is None:
        return None
    if attention == "se":
        return SELayer(channels)
    return (ECALayer if attention == "eca" else ECANSLayer)(channels, k)


class _Block(nn.Module):
    """The attention layer after the block's last BN: module ``eca`` (ECA, ECA-NS) or ``se``."""

    def _attach_attention(self, attention, channels, k_size):
        self.attention_attr = attention_attribute(attention)
        setattr(self, self.attention_attr, _attention(attention, channels, k_size))

    def _attend_and_add(self, out, x):
        attention = getattr(self, self.attention_attr)
        if attention is not None:
            out = attention(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def conv3x3(inp, out, stride=1):
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)


class ECABasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, k_size=3, attention="eca"):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self._attach_attention(attention, planes, k_size)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._attend_and_add(out, x)


class ECABottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, k_size=3, attention="eca"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self._attach_attention(attention, planes * 4, k_size)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._attend_and_add(out, x)


class ResNet(nn.Module):
    """The authors' ECA-ResNet; ``stem_width`` and ``stage_widths`` other than the paper's 64 and
    64/128/256/512 only for test_eca_resnet (resnet.Design's fields of the same names)."""

    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        k_size=(3, 3, 3, 3),
        attention="eca",
        stem_width=64,
        stage_widths=(64, 128, 256, 512),
    ):
        super().__init__()
        self.inplanes = stem_width
        self.attention = attention
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        w1, w2, w3, w4 = stage_widths
        self.layer1 = self._make_layer(block, w1, layers[0], int(k_size[0]))
        self.layer2 = self._make_layer(block, w2, layers[1], int(k_size[1]), stride=2)
        self.layer3 = self._make_layer(block, w3, layers[2], int(k_size[2]), stride=2)
        self.layer4 = self._make_layer(block, w4, layers[3], int(k_size[3]), stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, k_size, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, k_size, self.attention)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, k_size=k_size, attention=self.attention))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TimmBottleneck(nn.Module):
    """timm's Bottleneck: conv1 1x1, conv2 3x3 (stride, groups), conv3 1x1, each with BN; the
    attention (``se``) after bn3; ReLU after the residual add."""

    def __init__(self, inplanes, widths, stride, k_size, groups, attention, downsample):
        super().__init__()
        w1, w2, out = widths
        self.conv1 = nn.Conv2d(inplanes, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(w2, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.se = _attention(attention, out, k_size)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act3(out + shortcut)


class TimmResNet(nn.Module):
    """timm's ResNet as its ECA models use it: plain / deep / tiered stem, max-pool, Bottleneck
    stages (widths from ``design`` or planes * base_width / 64 * groups), avg-down shortcuts
    (AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False), 1x1 conv, BN), avg-pool, fc.
    """

    def __init__(self, layers, design, num_classes=1000, k_size=(5, 5, 5, 7), attention="eca"):
        super().__init__()
        if design.stem == "plain":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            c0, c1 = resnet.STEMS[design.stem]
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, c0, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.Conv2d(c0, c1, 3, padding=1, bias=False),
                nn.BatchNorm2d(c1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c1, 64, 3, padding=1, bias=False),
            )
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip(resnet.STAGE_WIDTHS, layers)):
            blocks = []
            for b in range(n):
                stride = 2 if i > 0 and b == 0 else 1
                if design.widths is not None:
                    widths = design.widths[i][b]
                else:
                    width = planes * design.base_width // 64 * design.groups
                    widths = (width, width, planes * 4)
                downsample = None
                if stride != 1 or inplanes != widths[2]:
                    pool = (
                        nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                        if stride > 1
                        else nn.Identity()
                    )
                    conv = nn.Conv2d(inplanes, widths[2], 1, bias=False)
                    downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(widths[2]))
                blocks.append(
                    TimmBottleneck(
                        inplanes,
                        widths,
                        stride,
                        int(k_size[i]),
                        design.groups,
                        attention,
                        downsample,
                    )
                )
                inplanes = widths[2]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, k_size, attention="eca"):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        att = _attention(attention, oup, k_size)
        if att is not None:
            layers.append(att)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ECAMobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes=1000,
        width_mult=1.0,
        attention="eca",
        k_small=1,
        k_large=3,
        block_k_sizes: Sequence[int] | None = None,
    ):
        """``block_k_sizes`` (17, one per block) overrides the k_small / k_large rule."""
        super().__init__()
        input_channel = int(32 * width_mult)
        self.last_channel = int(1280 * max(1.0, width_mult))
        setting = [
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        features = [ConvBNReLU(3, input_channel, stride=2)]
        block_ks = iter(block_k_sizes) if block_k_sizes is not None else None
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                ksize = next(block_ks) if block_ks else (k_small if c < 96 else k_large)
                features.append(
                    InvertedResidual(input_channel, output_channel, stride, t, ksize, attention)
                )
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.25), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean([2, 3]))


# --------------------------------------------------------------------------------------------
# timm's other ECA families, written from timm_eca_family2_facts.md (module names = its keys).


def _timm_k(channels: int) -> int:
    """timm's ECA kernel rule: t = int((log2 C + 1) / 2), odd, at least 3."""
    t = int(abs((math.log2(channels) + 1) / 2))
    return max(t if t % 2 else t + 1, 3)


def _eca(channels: int, attention) -> nn.Module | None:
    return None if attention is None else _attention(attention, channels, _timm_k(channels))


class CNA(nn.Module):
    """conv (no bias, pad ((s-1) + (k-1)) // 2) -> BN -> act: keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act="relu"):
        super().__init__()
        pad = ((stride - 1) + (k - 1)) // 2
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = {"relu": nn.ReLU(), "silu": nn.SiLU(), None: nn.Identity()}[act]

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, features, num_classes):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class OsaBlock(nn.Module):
    """VoVNet's OSA block: 5 chained 3x3 CNA, concat [x, y1..y5], 1x1 CNA, ECA, + x if residual."""

    def __init__(self, cin, mid, out, residual, attention):
        super().__init__()
        chs = [cin] + [mid] * 5
        self.conv_mid = nn.Sequential(*[CNA(c, mid, 3) for c in chs[:-1]])
        self.conv_concat = CNA(cin + 5 * mid, out, 1)
        self.attn = _eca(out, attention)
        self.residual = residual

    def forward(self, x):
        outs = [x]
        for layer in self.conv_mid:
            outs.append(layer(outs[-1]))
        y = self.conv_concat(torch.cat(outs, 1))
        if self.attn is not None:
            y = self.attn(y)
        return y + x if self.residual else y


class OsaStage(nn.Module):
    def __init__(self, blocks, downsample):
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.pool(x))


class VoVNet(nn.Module):
    """eca_vovnet39b: stem 3 CNA (64 s2, 64, 128 s2), OSA stages, avg pool, fc."""

    def __init__(self, name, num_classes=1000, attention="eca"):
        super().__init__()
        self.stem = nn.Sequential(CNA(3, 64, 3, 2), CNA(64, 64, 3), CNA(64, 128, 3, 2))
        stages, cin = [], 128
        for i, (mid, out, n) in enumerate(
            ((128, 256, 1), (160, 512, 1), (192, 768, 2), (224, 1024, 2))
        ):
            blocks = []
            for b in range(n):
                blocks.append(OsaBlock(cin, mid, out, b > 0, attention if b == n - 1 else None))
                cin = out
            stages.append(OsaStage(blocks, i > 0))
        self.stages = nn.Sequential(*stages)
        self.head = Head(cin, num_classes)

    def stage_features(self, x):
        x, out = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.head(self.stage_features(x)[-1])


class ByobBottleneck(nn.Module):
    """byobnet's BottleneckBlock: CNA 1x1, CNA 3x3 (stride, groups), ECA on mid, conv 1x1 + BN,
    + shortcut (strided 1x1 conv + BN), SiLU."""

    def __init__(self, cin, cout, stride, groups, attention):
        super().__init__()
        mid = cout // 4
        self.conv1_1x1 = CNA(cin, mid, 1, act="silu")
        self.conv2_kxk = CNA(mid, mid, 3, stride, groups, act="silu")
        self.attn = _eca(mid, attention)
        self.conv3_1x1 = CNA(mid, cout, 1, act=None)
        self.shortcut = CNA(cin, cout, 1, stride, act=None) if stride > 1 or cin != cout else None

    def forward(self, x):
        h = self.conv2_kxk(self.conv1_1x1(x))
        if self.attn is not None:
            h = self.attn(h)
        h = self.conv3_1x1(h)
        return nn.functional.silu(h + (x if self.shortcut is None else self.shortcut(x)))


class RelPos(nn.Module):
    def __init__(self, window, dim_head=16):
        super().__init__()
        self.height_rel = nn.Parameter(0.25 * torch.randn(2 * window - 1, dim_head))
        self.width_rel = nn.Parameter(0.25 * torch.randn(2 * window - 1, dim_head))


def _rel_logits(q, rel, queries, keys):
    """q (..., queries, d) . rel[k - q + keys - 1] -> (..., queries, keys)."""
    idx = torch.arange(keys)[None, :] - torch.arange(queries)[:, None] + keys - 1
    return torch.einsum("...qd,qkd->...qk", q, rel[idx])


class BotAttn(nn.Module):
    """BoT: 4 heads, q/k 16, v = mid/4; qkv channels [Q | K | V], head-major; all-to-all on
    F x F; logits 0.25 q.k + q.Rh[h'-h+F-1] + q.Rw[w'-w+F-1]; AvgPool 2 when strided."""

    def __init__(self, dim, stride, feat):
        super().__init__()
        self.dim, self.stride, self.feat = dim, stride, feat
        self.qkv = nn.Conv2d(dim, 128 + dim, 1, bias=False)
        self.pos_embed = RelPos(feat)

    def forward(self, x):
        b, _, h, w = x.shape
        assert (h, w) == (self.feat, self.feat)
        dv = self.dim // 4
        q, k, v = torch.split(self.qkv(x), [64, 64, self.dim], dim=1)
        q = q.reshape(b, 4, 16, h, w).permute(0, 1, 3, 4, 2)  # b n h w d
        k = k.reshape(b, 4, 16, h * w)
        v = v.reshape(b, 4, dv, h * w)
        logits = 0.25 * torch.einsum("bnhwd,bndp->bnhwp", q, k).reshape(b, 4, h, w, h, w)
        qt = q.permute(0, 1, 3, 2, 4)  # b n w h d: h is the query axis
        rh = _rel_logits(qt, self.pos_embed.height_rel, h, h).permute(0, 1, 3, 2, 4)
        rw = _rel_logits(q, self.pos_embed.width_rel, w, w)
        logits = logits + rh[..., :, None] + rw[..., None, :]
        attn = logits.reshape(b, 4, h * w, h * w).softmax(-1)
        out = torch.einsum("bnqp,bncp->bncq", attn, v).reshape(b, self.dim, h, w)
        return nn.functional.avg_pool2d(out, 2) if self.stride == 2 else out


class HaloAttnT(nn.Module):
    """Halo: 8 heads, q/k 16, v = mid/8, block 8, halo 2; q conv strided; kv per head [k|v];
    12x12 windows of the zero-padded kv (unmasked); local relative indices."""

    def __init__(self, dim, stride):
        super().__init__()
        self.dim, self.stride = dim, stride
        self.q = nn.Conv2d(dim, 128, 1, stride=stride, bias=False)
        self.kv = nn.Conv2d(dim, 128 + dim, 1, bias=False)
        self.pos_embed = RelPos(12)

    def forward(self, x):
        b, _, h, w = x.shape
        dv, bq = self.dim // 8, 8 // self.stride
        q = self.q(x)
        kv = nn.functional.pad(self.kv(x), (2, 2, 2, 2))
        out = torch.zeros(b, self.dim, h // self.stride, w // self.stride)
        for i in range(h // 8):
            for j in range(w // 8):
                qb = q[:, :, i * bq : (i + 1) * bq, j * bq : (j + 1) * bq]
                qb = qb.reshape(b, 8, 16, bq, bq).permute(0, 1, 3, 4, 2)  # b n qh qw d
                win = kv[:, :, 8 * i : 8 * i + 12, 8 * j : 8 * j + 12].reshape(
                    b, 8, 16 + dv, 12, 12
                )
                kb, vb = win[:, :, :16], win[:, :, 16:]
                logits = 0.25 * torch.einsum("bnhwd,bndkl->bnhwkl", qb, kb)
                idx = torch.arange(12)[None, :] - torch.arange(bq)[:, None] + 11
                th = self.pos_embed.height_rel[idx]  # (bq, 12, d)
                tw = self.pos_embed.width_rel[idx]
                logits = logits + torch.einsum("bnhwd,hkd->bnhwk", qb, th)[..., :, None]
                logits = logits + torch.einsum("bnhwd,wld->bnhwl", qb, tw)[..., None, :]
                attn = logits.reshape(b, 8, bq, bq, 144).softmax(-1).reshape(logits.shape)
                o = torch.einsum("bnhwkl,bnckl->bnchw", attn, vb).reshape(b, self.dim, bq, bq)
                out[:, :, i * bq : (i + 1) * bq, j * bq : (j + 1) * bq] = o
        return out


class ByobSelfAttn(nn.Module):
    """byoanet's SelfAttnBlock: CNA 1x1, BoT / Halo, post_attn BN + SiLU, conv 1x1 + BN,
    + shortcut, SiLU."""

    def __init__(self, cin, cout, stride, kind, feat):
        super().__init__()
        mid = cout // 4
        self.conv1_1x1 = CNA(cin, mid, 1, act="silu")
        self.self_attn = BotAttn(mid, stride, feat) if kind == "bot" else HaloAttnT(mid, stride)
        self.post_attn = nn.BatchNorm2d(mid)
        self.conv3_1x1 = CNA(mid, cout, 1, act=None)
        self.shortcut = CNA(cin, cout, 1, stride, act=None) if stride > 1 or cin != cout else None

    def forward(self, x):
        h = nn.functional.silu(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        h = self.conv3_1x1(h)
        return nn.functional.silu(h + (x if self.shortcut is None else self.shortcut(x)))


class ByobStem(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv1 = CNA(3, 24, 3, 2, act="silu")
        self.conv2 = CNA(24, 32, 3, act="silu")
        self.conv3 = CNA(32, 64, 3, 1 if pool else 2, act="silu")
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.conv3(self.conv2(self.conv1(x))))


class ByobNet(nn.Module):
    """timm's ECA ByobNets from the facts: tiered stem, bottleneck / self-attention stages,
    [final_conv], avg pool, fc. Depths and widths as in ``byob.DESIGNS`` (the facts' table)."""

    def __init__(self, name, num_classes=1000, attention="eca"):
        super().__init__()
        from eca_flax.models.byob import DESIGNS, SELF_ATTN_BLOCKS

        d = DESIGNS[name]
        self.stem = ByobStem(d.stem_pool)
        stages, cin, feat = [], 64, 64
        for s, (n, cout) in enumerate(zip(d.depths, d.widths)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                if d.self_attn and (s, b) in SELF_ATTN_BLOCKS:
                    blocks.append(ByobSelfAttn(cin, cout, stride, d.self_attn, feat))
                else:
                    groups = cout // 4 // d.group_size if d.group_size else 1
                    blocks.append(ByobBottleneck(cin, cout, stride, groups, attention))
                feat //= stride
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = CNA(cin, d.final_chs, 1, act="silu") if d.final_chs else None
        self.head = Head(d.final_chs or cin, num_classes)

    def stage_features(self, x):
        x, out = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        if self.final_conv is not None:
            out[-1] = self.final_conv(out[-1])
        return out

    def forward(self, x):
        return self.head(self.stage_features(x)[-1])


class WSConv(nn.Conv2d):
    """ScaledStdConv2d from the facts: conv(x, gain * gamma * (W - mu) / sqrt(var + 1e-5) /
    sqrt(N)) + bias, population variance over each output channel's N weights."""

    def __init__(self, cin, cout, k, stride=1, groups=1, gamma=1.0):
        pad = ((stride - 1) + (k - 1)) // 2
        super().__init__(cin, cout, k, stride, pad, groups=groups, bias=True)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.gamma = gamma

    def forward(self, x):
        w = self.weight
        n = w[0].numel()
        mu = w.mean((1, 2, 3), keepdim=True)
        var = ((w - mu) ** 2).mean((1, 2, 3), keepdim=True)
        w = self.gain * self.gamma * (w - mu) / torch.sqrt(var + 1e-5) / math.sqrt(n)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, 1, self.groups)


class NfDownsample(nn.Module):
    def __init__(self, cin, cout, stride, gamma):
        super().__init__()
        self.pool = (
            nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )
        self.conv = WSConv(cin, cout, 1, gamma=gamma)

    def forward(self, x):
        return self.conv(self.pool(x))


class NfBlock(nn.Module):
    """NormFreeBlock from the facts: a = beta * act(x); shortcut = downsample(a) or x;
    conv1, act, conv2 (stride, groups), [act, conv2b], act, conv3; 2 * ECA; alpha * h + shortcut."""

    def __init__(self, cin, cout, stride, beta, groups, conv2b, act, gamma, attention):
        super().__init__()
        mid = cout // 4
        self.beta, self.act = beta, {"silu": nn.functional.silu, "relu": nn.functional.relu}[act]
        need = stride > 1 or cin != cout
        self.downsample = NfDownsample(cin, cout, stride, gamma) if need else None
        self.conv1 = WSConv(cin, mid, 1, gamma=gamma)
        self.conv2 = WSConv(mid, mid, 3, stride, groups, gamma)
        self.conv2b = WSConv(mid, mid, 3, 1, groups, gamma) if conv2b else None
        self.conv3 = WSConv(mid, cout, 1, gamma=gamma)
        self.attn_last = _eca(cout, attention)

    def forward(self, x):
        a = self.act(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(a)
        h = self.conv2(self.act(self.conv1(a)))
        if self.conv2b is not None:
            h = self.conv2b(self.act(h))
        h = self.conv3(self.act(h))
        if self.attn_last is not None:
            h = 2.0 * self.attn_last(h)
        return 0.2 * h + shortcut


class NfQuadStem(nn.Module):
    def __init__(self, gamma):
        super().__init__()
        self.conv1 = WSConv(3, 16, 3, 2, gamma=gamma)
        self.conv2 = WSConv(16, 32, 3, gamma=gamma)
        self.conv3 = WSConv(32, 64, 3, gamma=gamma)
        self.conv4 = WSConv(64, 128, 3, 2, gamma=gamma)

    def forward(self, x):
        f = nn.functional.silu
        return self.conv4(f(self.conv3(f(self.conv2(f(self.conv1(x)))))))


class NfResStem(nn.Module):
    def __init__(self, gamma):
        super().__init__()
        self.conv = WSConv(3, 64, 7, 2, gamma=gamma)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(self.conv(x))


class NormFreeNet(nn.Module):
    """eca_nfnet_l* / nf_ecaresnet* from the facts' table (depths, widths in nfnet.DESIGNS)."""

    def __init__(self, name, num_classes=1000, attention="eca"):
        super().__init__()
        from eca_flax.models.nfnet import DESIGNS

        d = DESIGNS[name]
        gamma = {"silu": 1.7881293296813965, "relu": 1.7139588594436646}[d.act]
        self.act = {"silu": nn.functional.silu, "relu": nn.functional.relu}[d.act]
        quad = d.stem == "quad"
        self.stem = NfQuadStem(gamma) if quad else NfResStem(gamma)
        cin, var, stages = 128 if quad else 64, 1.0, []
        for s, (n, cout) in enumerate(zip(d.depths, d.widths)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                groups = cout // 4 // d.group_size if d.group_size else 1
                beta = var**-0.5
                blocks.append(
                    NfBlock(cin, cout, stride, beta, groups, d.conv2b, d.act, gamma, attention)
                )
                var = 1.0 if b == 0 else var  # the shortcut of block 0 resets the variance
                var += 0.2**2
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = WSConv(cin, d.final_chs, 1, gamma=gamma) if d.final_chs else None
        self.head = Head(d.final_chs or cin, num_classes)

    def stage_features(self, x):
        x, out = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        if self.final_conv is not None:
            out[-1] = self.final_conv(out[-1])
        out[-1] = self.act(out[-1])
        return out

    def forward(self, x):
        return self.head(self.stage_features(x)[-1])


FAMILY_REFERENCES = {"vovnet": VoVNet, "byob": ByobNet, "nfnet": NormFreeNet}


def build(
    name: str, *, k_size: KSize = None, num_classes: int = 1000, attention: str | None = "eca"
) -> nn.Module:
    """The reference model for one of eca_flax's model names.

    ``k_size`` is read exactly as ``eca_flax.create_model`` reads it (None: the released sizes).
    """
    ks = resolve_k_size(name, k_size)
    info = model_info(name)
    attention = model_attention(name, attention)
    if info.family == "mobilenet_v2":
        return ECAMobileNetV2(num_classes, attention=attention, block_k_sizes=ks)
    if info.family in FAMILY_REFERENCES:
        return FAMILY_REFERENCES[info.family](name, num_classes, attention)
    block, layers, design = resnet_layout(name)
    if info.source == TIMM:
        return TimmResNet(layers, design, num_classes, ks, attention)
    torch_block = ECABottleneck if block.expansion == 4 else ECABasicBlock
    widths = dict(stem_width=design.stem_width, stage_widths=design.stage_widths)
    return ResNet(torch_block, layers, num_classes, ks, attention, **widths)


def logits(name: str, state_dict: dict, images, **build_kwargs):
    """The eval-mode logits (numpy) of ``build(name, **build_kwargs)`` holding ``state_dict``
    (numpy arrays, original keys) on NHWC ``images``.

    Not strict: a bare state_dict may lack num_batches_tracked (the converter has checked every
    other key against the Flax model already).
    """
    reference = build(name, **build_kwargs)
    reference.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=False
    )
    reference.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        return reference(x).numpy()


# --------------------------------------------------------------------------------------------
# Random weights for parity tests.


def residual_scale(name: str) -> float:
    """How much ``random_reference`` damps each residual branch of ``name``.

    With random weights, ResNet-101/152's 33 and 50 undamped blocks amplify float32 rounding
    until even PyTorch disagrees with itself in float64 by 20-70%; 0.25 keeps them well
    conditioned. The shallower models need none. By blocks: 16 (ResNet-50's) need none, timm's
    ecaresnet200d / 269d (66 and 89 blocks) 0.1.
    """
    info = model_info(name)
    if info.family in ("byob", "nfnet"):
        return 0.5  # as trained networks' small last BN: ~10 blocks stay well conditioned
    blocks = sum(resnet_layout(name)[1]) if info.family == "resnet" else 0
    return 1.0 if blocks <= 16 else 0.25 if blocks <= 50 else 0.1


def random_reference(name: str, seed: int = 0, **build_kwargs) -> nn.Module:
    """``build(name, **build_kwargs)`` with random weights and BN statistics, in eval mode."""
    return randomize(build(name, **build_kwargs), seed, residual_scale(name)).eval()


def randomize(model: nn.Module, seed: int = 0, residual_scale: float = 1.0) -> nn.Module:
    """Random weights and BN statistics, so parity tests exercise every tensor.

    ``residual_scale`` multiplies each residual branch's last BN weight (see ``residual_scale``).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, nn.Conv1d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            if isinstance(m, WSConv):
                m.gain.copy_(0.5 + torch.rand(m.gain.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, RelPos):
                m.height_rel.copy_(0.25 * torch.randn(m.height_rel.shape, generator=g))
                m.width_rel.copy_(0.25 * torch.randn(m.width_rel.shape, generator=g))
        for m in model.modules():
            if isinstance(m, ByobBottleneck | ByobSelfAttn):
                m.conv3_1x1.bn.weight.mul_(residual_scale)
            if isinstance(m, NfBlock):  # small last gain, as trained residual branches have
                m.conv3.gain.mul_(residual_scale)
            if isinstance(m, ECABottleneck | ECABasicBlock | TimmBottleneck):
                (m.bn2 if isinstance(m, ECABasicBlock) else m.bn3).weight.mul_(residual_scale)
    return model


def numpy_state_dict(model: nn.Module) -> dict:
    """The state_dict as numpy arrays (what eca_flax.weights.convert.load_state_dict takes)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def stage_features(model: nn.Module, images) -> list[np.ndarray]:
    """C2-C5: the outputs of layer1..layer4 (NHWC numpy) of a reference ResNet on NHWC
    ``images``, as a detector's backbone hands them to its neck (the model's mode as it is)."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        features = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
            features.append(x.numpy().transpose(0, 2, 3, 1))
        return features


# --------------------------------------------------------------------------------------------
# timm's Hugging Face Hub layout.


def hub_config(name: str, model: nn.Module, tag: str | None = None) -> dict:
    """config.json as timm's ``save_for_hf`` writes it for ``name`` (tag: the registry's first),
    its pretrained_cfg from the registry (timm_eca_facts.md, timm_eca_family2_facts.md)."""
    info = model_info(name)
    t = next((t for t in info.tags if t.tag == tag), info.tags[0] if info.tags else None)
    input_size, crop = (
        (t.input_size, t.crop_pct) if t else (info.default_size, info.default_crop_pct)
    )
    test_size, test_crop = (t.test_size, t.test_crop_pct) if t else (input_size, crop)
    fc = model.head.fc if hasattr(model, "head") else model.fc
    if hasattr(model, "head"):
        first_conv = next(k for k in model.state_dict() if k.endswith("weight")).rsplit(".", 1)[0]
    else:
        first_conv = "conv1" if isinstance(model.conv1, nn.Conv2d) else "conv1.0"
    pretrained_cfg = {
        "tag": t.tag if t else "untrained",
        "custom_load": False,
        "input_size": [3, input_size, input_size],
        "test_input_size": [3, test_size, test_size],
        "fixed_input_size": info.size_rule is not None and info.size_rule[0] == "only",
        "interpolation": t.interpolation if t else "bicubic",
        "crop_pct": crop,
        "test_crop_pct": test_crop,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": fc.out_features,
        "pool_size": [input_size // 32, input_size // 32],
        "first_conv": first_conv,
        "classifier": "head.fc" if hasattr(model, "head") else "fc",
    }
    return {
        "architecture": name,
        "num_classes": fc.out_features,
        "num_features": fc.in_features,
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
    }


def save_hub_folder(
    name: str,
    model: nn.Module,
    path,
    *,
    tag: str | None = None,
    config: dict | None = None,
    bin_file: bool = False,
) -> None:
    """``model`` as a Hub folder: config.json + model.safetensors (float32, num_batches_tracked
    as int64, metadata {"format": "pt"}), or pytorch_model.bin (torch.save) with ``bin_file``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hub_config(name, model, tag) if config is None else config
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if bin_file:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
