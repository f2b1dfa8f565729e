"""timm's ECA ByobNets: eca_resnet33ts, eca_resnext26ts, and the hybrids with self-attention,
eca_botnext26ts_256 (Bottleneck Transformer) and eca_halonext26ts (HaloNet).

All convolutions are ConvNormAct (SiLU); the stem is "tiered" (24, 32, 64); each stage's first
block has a strided 1x1 conv + BN shortcut; the bottleneck keeps ECA on its middle width. In the
hybrids, stages.2.1, 3.0 and 3.1 are self-attention blocks. Attribute names follow timm's
state_dict (``stem.conv1.conv``, ``stages.2.1.self_attn.pos_embed.height_rel``, ``head.fc``).
The relative-position tables are stored transposed, (dim_head, 2W - 1), as the converter's rank
rule gives every 2-D tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models.layers import (
    ConvNormAct,
    Head,
    Sequential,
    attention_choice,
    batch_norm,
    max_pool_3x3_s2,
    timm_eca,
    truncated_normal_init,
)

Array = jax.Array
Dtype = Any
_DIM_HEAD = 16  # q / k channels per head in both attentions


@dataclasses.dataclass(frozen=True)
class ByobDesign:
    """One model: blocks per stage, output widths, 3x3 group size (0: no groups), whether the
    stem ends in a max-pool, the final 1x1 conv width (0: none), the attention of
    stages.2.1 / 3.x ("" for none, "bot", "halo") and the only / multiple input size rule."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    group_size: int
    stem_pool: bool
    final_chs: int = 0
    self_attn: str = ""
    size_rule: tuple[str, int] | None = None


DESIGNS = {
    "eca_resnet33ts": ByobDesign((2, 3, 3, 2), (256, 512, 1536, 1536), 0, False, 1280),
    "eca_resnext26ts": ByobDesign((2, 2, 2, 2), (256, 512, 1024, 2048), 32, True),
    "eca_botnext26ts_256": ByobDesign(
        (2, 2, 2, 2), (256, 512, 1024, 2048), 16, True, 0, "bot", ("only", 256)
    ),
    "eca_halonext26ts": ByobDesign(
        (2, 2, 2, 2), (256, 512, 1024, 2048), 16, True, 0, "halo", ("multiple", 256)
    ),
}
SELF_ATTN_BLOCKS = {(2, 1), (3, 0), (3, 1)}  # (stage, block) of the hybrids' attention blocks


def check_input_size(name: str, height: int, width: int) -> None:
    """ValueError in one line when ``name``'s attention cannot take a height x width input."""
    rule = DESIGNS[name].size_rule if name in DESIGNS else None
    if rule is None:
        return
    kind, n = rule
    if kind == "only" and (height, width) != (n, n):
        raise ValueError(
            f"{name} takes {n}x{n} input only (its BoT position tables are built for a "
            f"{n // 16}x{n // 16} map); got {height}x{width}"
        )
    if kind == "multiple" and (height % n or width % n or not height or not width):
        raise ValueError(
            f"{name} needs an input whose sides are multiples of {n} (its 8x8 Halo attention "
            f"blocks tile the stride-32 map); got {height}x{width}"
        )


def _conv1x1(cin: int, cout: int, stride: int, std: float, **kw) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (1, 1),
        strides=(stride, stride),
        padding=((0, 0), (0, 0)),
        use_bias=False,
        kernel_init=truncated_normal_init(std),
        **kw,
    )


class PosEmbedRel(nnx.Module):
    """Relative position tables ``height_rel`` / ``width_rel`` (stored (dim_head, 2W - 1))."""

    def __init__(self, window: int, dim_head: int, *, param_dtype: Dtype, rngs: nnx.Rngs):
        init = truncated_normal_init(0.25)
        shape = (dim_head, 2 * window - 1)
        self.height_rel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.width_rel = nnx.Param(init(rngs.params(), shape, param_dtype))

    def tables(self, queries: int, keys: int, offset: int) -> tuple[Array, Array]:
        """(queries, keys, dim_head) tables: row [q, k] = rel[k - q + offset]."""
        idx = jnp.arange(keys)[None, :] - jnp.arange(queries)[:, None] + offset
        return self.height_rel[...].T[idx], self.width_rel[...].T[idx]


class BottleneckAttn(nnx.Module):
    """BoT's all-to-all attention on an F x F map: 4 heads, q/k 16 channels each, values mid/4;
    logits 0.25 q.k + q.Rh[h' - h + F - 1] + q.Rw[w' - w + F - 1]; AvgPool 2x2 after, when
    strided. ``qkv`` channels: [Q | K | V], each head-major."""

    heads = 4

    def __init__(self, dim: int, stride: int, feat: int, *, dtype, param_dtype, rngs):
        self.dim, self.stride, self.feat = dim, stride, feat
        qk = self.heads * _DIM_HEAD
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = _conv1x1(dim, 2 * qk + dim, 1, dim**-0.5, **kw)
        self.pos_embed = PosEmbedRel(feat, _DIM_HEAD, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, _ = x.shape
        if (h, w) != (self.feat, self.feat):
            raise ValueError(f"BoT attention built for a {self.feat}x{self.feat} map, got {h}x{w}")
        n, d, dv = self.heads, _DIM_HEAD, self.dim // self.heads
        qkv = self.qkv(x).astype(jnp.float32)
        q = qkv[..., : n * d].reshape(b, h, w, n, d)
        k = qkv[..., n * d : 2 * n * d].reshape(b, h, w, n, d)
        v = qkv[..., 2 * n * d :].reshape(b, h, w, n, dv)
        th, tw = self.pos_embed.tables(h, h, h - 1)
        logits = 0.25 * jnp.einsum("bhwnd,bklnd->bnhwkl", q, k)
        logits += jnp.einsum("bhwnd,hkd->bnhwk", q, th)[..., :, None]
        logits += jnp.einsum("bhwnd,wld->bnhwl", q, tw)[..., None, :]
        attn = jax.nn.softmax(logits.reshape(b, n, h, w, h * w), axis=-1)
        out = jnp.einsum("bnhwp,bpnc->bhwnc", attn, v.reshape(b, h * w, n, dv))
        out = out.reshape(b, h, w, n * dv)
        if self.stride == 2:
            out = out.reshape(b, h // 2, 2, w // 2, 2, n * dv).mean(axis=(2, 4))
        return out.astype(x.dtype)


class HaloAttn(nnx.Module):
    """HaloNet's blocked attention: 8 heads, q/k 16 channels, values mid/8; each 8x8 block of
    queries (4x4 when strided: the q conv has stride 2) attends to its 12x12 window (halo 2,
    zero padding unmasked). ``q`` channels head-major; ``kv`` per head [k (16) | v (mid/8)]."""

    heads, block, halo = 8, 8, 2

    def __init__(self, dim: int, stride: int, *, dtype, param_dtype, rngs):
        self.dim, self.stride = dim, stride
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qk = self.heads * _DIM_HEAD
        self.q = _conv1x1(dim, qk, stride, dim**-0.5, **kw)
        self.kv = _conv1x1(dim, qk + dim, 1, dim**-0.5, **kw)
        window = self.block + 2 * self.halo
        self.pos_embed = PosEmbedRel(window, _DIM_HEAD, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, _ = x.shape
        bs, halo, n, d = self.block, self.halo, self.heads, _DIM_HEAD
        if h % bs or w % bs:
            raise ValueError(
                f"Halo attention needs a map whose sides are multiples of 8, got {h}x{w}"
            )
        dv, win, bq = self.dim // n, bs + 2 * halo, bs // self.stride
        nh, nw = h // bs, w // bs
        q = self.q(x).astype(jnp.float32).reshape(b, nh, bq, nw, bq, n, d)
        kv = self.kv(x).astype(jnp.float32)
        kv = jnp.pad(kv, ((0, 0), (halo, halo), (halo, halo), (0, 0)))
        rows = (jnp.arange(nh) * bs)[:, None] + jnp.arange(win)[None, :]  # (nh, win)
        cols = (jnp.arange(nw) * bs)[:, None] + jnp.arange(win)[None, :]
        kv = kv[:, rows][:, :, :, cols]  # (b, nh, win, nw, win, C)
        kv = kv.reshape(b, nh, win, nw, win, n, d + dv)
        k, v = kv[..., :d], kv[..., d:]
        th, tw = self.pos_embed.tables(bq, win, win - 1)
        logits = 0.25 * jnp.einsum("bipjqnd,bikjlnd->bijnpqkl", q, k)
        logits += jnp.einsum("bipjqnd,pkd->bijnpqk", q, th)[..., :, None]
        logits += jnp.einsum("bipjqnd,qld->bijnpql", q, tw)[..., None, :]
        shape = logits.shape
        attn = jax.nn.softmax(logits.reshape(*shape[:6], win * win), axis=-1).reshape(shape)
        out = jnp.einsum("bijnpqkl,bikjlnc->bipjqnc", attn, v)
        return out.reshape(b, nh * bq, nw * bq, n * dv).astype(x.dtype)


class BottleneckBlock(nnx.Module):
    """CNA 1x1 -> CNA 3x3 (stride, groups) -> ECA (mid chs) -> conv 1x1 + BN; + shortcut; SiLU."""

    def __init__(self, cin, cout, stride, groups, attention, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mid = cout // 4
        self.conv1_1x1 = ConvNormAct(cin, mid, 1, act="silu", **kw)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=groups, act="silu", **kw)
        self.attn = timm_eca(mid, attention, **kw)
        self.conv3_1x1 = _last(mid, cout, **kw)
        self.shortcut = _shortcut(cin, cout, stride, **kw)

    def __call__(self, x: Array) -> Array:
        h = self.conv2_kxk(self.conv1_1x1(x))
        if self.attn is not None:
            h = self.attn(h)
        h = self.conv3_1x1(h)
        return nnx.silu(h + (x if self.shortcut is None else self.shortcut(x)))


class SelfAttnBlock(nnx.Module):
    """CNA 1x1 -> BoT / Halo attention (stride inside) -> BN + SiLU (``post_attn``) -> conv 1x1
    + BN; + shortcut; SiLU."""

    def __init__(self, cin, cout, stride, kind, feat, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mid = cout // 4
        self.conv1_1x1 = ConvNormAct(cin, mid, 1, act="silu", **kw)
        if kind == "bot":
            self.self_attn = BottleneckAttn(mid, stride, feat, **kw)
        else:
            self.self_attn = HaloAttn(mid, stride, **kw)
        self.post_attn = batch_norm(mid, **kw)
        self.conv3_1x1 = _last(mid, cout, **kw)
        self.shortcut = _shortcut(cin, cout, stride, **kw)

    def __call__(self, x: Array) -> Array:
        h = nnx.silu(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        h = self.conv3_1x1(h)
        return nnx.silu(h + (x if self.shortcut is None else self.shortcut(x)))


def _last(mid: int, cout: int, **kw) -> ConvNormAct:
    """The block's last conv + BN, its BN scale zero (timm's zero_init_last) for training."""
    layer = ConvNormAct(mid, cout, 1, act=None, **kw)
    layer.bn.scale.set_value(jnp.zeros_like(layer.bn.scale[...]))
    return layer


def _shortcut(cin: int, cout: int, stride: int, **kw) -> ConvNormAct | None:
    """A strided 1x1 conv + BN where the shape changes (block 0 of each stage), else identity."""
    if stride == 1 and cin == cout:
        return None
    return ConvNormAct(cin, cout, 1, stride=stride, act=None, **kw)


class TieredStem(nnx.Module):
    """conv1 3x3/2 3->24, conv2 24->32, conv3 32->64 (stride 2 without the pool), each BN +
    SiLU, then MaxPool 3x3/2 pad 1 (``pool``): stride 4 either way."""

    def __init__(self, pool: bool, **kw):
        self.pool = pool
        self.conv1 = ConvNormAct(3, 24, 3, stride=2, act="silu", **kw)
        self.conv2 = ConvNormAct(24, 32, 3, act="silu", **kw)
        self.conv3 = ConvNormAct(32, 64, 3, stride=1 if pool else 2, act="silu", **kw)

    def __call__(self, x: Array) -> Array:
        x = self.conv3(self.conv2(self.conv1(x)))
        return max_pool_3x3_s2(x) if self.pool else x


class ByobNet(nnx.Module):
    """One of timm's ECA ByobNets (``DESIGNS``) for NHWC images; float32 logits.

    ``attention``: "eca" (timm's), "eca_ns" or None (the bottlenecks' ECA layers); ``design``
    replaces ``arch``'s (a smaller network of the same blocks, say).
    ``num_classes=0`` builds a backbone without ``head`` (``stage_features`` only).
    """

    def __init__(
        self,
        *,
        arch: str,
        num_classes: int = 1000,
        attention: str | None = "eca",
        design: ByobDesign | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        design = DESIGNS[arch] if design is None else design  # another design: e.g. tests
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.arch, self.dtype, self.k_size = arch, dtype, ()
        self.attention = attention_choice(attention)
        self.stem = TieredStem(design.stem_pool, **kw)
        stages, cin, feat = [], 64, 64  # feat: the map side at 256 px input (BoT's tables)
        for s, (n, cout) in enumerate(zip(design.depths, design.widths)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                if design.self_attn and (s, b) in SELF_ATTN_BLOCKS:
                    blk = SelfAttnBlock(cin, cout, stride, design.self_attn, feat, **kw)
                else:
                    groups = (cout // 4) // design.group_size if design.group_size else 1
                    blk = BottleneckBlock(cin, cout, stride, groups, attention, **kw)
                blocks.append(blk)
                feat //= stride
                cin = cout
            stages.append(Sequential(blocks))
        self.stages = Sequential(stages)
        final = design.final_chs
        self.final_conv = ConvNormAct(cin, final, 1, act="silu", **kw) if final else None
        self.num_features = final or cin
        self.head = Head(self.num_features, num_classes, **kw) if num_classes else None

    @staticmethod
    def depths(name: str) -> tuple[int, ...]:
        """Blocks per stage of ``name`` (what a state_dict's keys are matched against)."""
        return DESIGNS[name].depths

    def stage_features(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """The four stages' outputs at strides 4, 8, 16, 32 (eca_resnet33ts's last one after
        ``final_conv``, as the head sees it)."""
        check_input_size(self.arch, x.shape[1], x.shape[2])
        x = self.stem(x.astype(self.dtype))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if self.final_conv is not None:
            features[-1] = self.final_conv(features[-1])
        return tuple(features)

    def __call__(self, x: Array) -> Array:
        if self.head is None:
            raise TypeError("a backbone without a classifier (num_classes=0): use stage_features")
        return self.head(self.stage_features(x)[-1])
