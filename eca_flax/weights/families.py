"""Which of timm's other ECA models (VoVNet, ByobNet, NFNet: timm_eca_family2_facts.md) a
state_dict holds, from its keys and shapes alone; look-alikes outside the ECA family (eSE, SE,
no attention) are named in one line. ``convert.load_state_dict`` then checks every shape."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from eca_flax.errors import ConversionError
from eca_flax.models.registry import OTHER_FAMILIES, list_models, model_info
from eca_flax.weights.arch import ArchSpec, eca_kernel, head_classes

_STAGE_BLOCK = {
    "vovnet": re.compile(r"stages\.(\d+)\.blocks\.(\d+)\."),
    "byob": re.compile(r"stages\.(\d+)\.(\d+)\."),
    "nfnet": re.compile(r"stages\.(\d+)\.(\d+)\."),
}
_ECA = re.compile(r"(.*)\.(attn|attn_last)\.conv\.weight")


def family_of(sd: Mapping[str, Any]) -> str | None:
    """ "vovnet", "byob", "nfnet" from the stem's keys, or None (not one of these layouts)."""
    if "stem.0.conv.weight" in sd and any(".blocks.0.conv_mid." in k for k in sd):
        return "vovnet"
    if "stem.conv1.conv.weight" in sd and any(k.startswith("stages.") for k in sd):
        return "byob"
    if ("stem.conv1.gain" in sd or "stem.conv.gain" in sd) and any(
        k.startswith("stages.") for k in sd
    ):
        return "nfnet"
    return None


def blocks_per_stage(sd: Mapping[str, Any], family: str) -> tuple[int, ...]:
    """Blocks per stage, from the ``stages.S[.blocks].B.`` keys."""
    counts: dict[int, int] = {}
    for key in sd:
        if m := _STAGE_BLOCK[family].match(key):
            s, b = int(m.group(1)), int(m.group(2))
            counts[s] = max(counts.get(s, 0), b + 1)
    return tuple(counts.get(s, 0) for s in range(max(counts, default=-1) + 1))


def _attention(sd: Mapping[str, Any], family: str) -> str | None:
    """ "eca" / "eca_ns" from the ECA kernels' shapes; look-alikes without ECA: one line."""
    kinds = {eca_kernel(k, tuple(np.shape(v)))[0] for k, v in sd.items() if _ECA.fullmatch(k)}
    if len(kinds) > 1:
        raise ConversionError("the state_dict mixes shared ECA (1, 1, k) and ECA-NS (C, 1, k)")
    if kinds:
        return kinds.pop()
    keys = " ".join(sd)
    if family == "vovnet":
        what = (
            "ese_vovnet39b-like (eSE attention: attn.fc)"
            if ".attn.fc." in keys
            else "a VoVNet without attention (e.g. vovnet39a)"
        )
    elif family == "byob":
        what = (
            "an SE byobnet (e.g. seresnext26ts: attn.fc1)"
            if ".attn.fc1." in keys
            else "a byobnet without ECA (e.g. resnet33ts, resnext26ts, botnet26t, halonet26t)"
        )
    else:
        what = (
            "an NFNet with SE attention (e.g. nfnet_l0: attn_last.fc1)"
            if ".attn_last.fc1." in keys
            else "an NF network without ECA (e.g. nf_resnet50)"
        )
    raise ConversionError(
        f"a timm {family} state_dict that is {what}, not an ECA model; eca_flax converts "
        f"{', '.join(n for n in list_models() if model_info(n).family == family)}"
    )


def _candidates(sd: Mapping[str, Any], family: str) -> list[str]:
    """The family's models whose distinguishing keys this state_dict has."""
    has = set(sd)
    names = [n for n in list_models() if model_info(n).family == family]
    if family == "byob":
        if any(k.endswith(".self_attn.qkv.weight") for k in has):
            names = [n for n in names if "botnext" in n]
        elif any(k.endswith(".self_attn.kv.weight") for k in has):
            names = [n for n in names if "halonext" in n]
        else:
            final = "final_conv.conv.weight" in has
            names = [n for n in names if "next" not in n or "resnext" in n]
            names = [n for n in names if ("33ts" in n) == final]
    if family == "nfnet":
        stem = "stem.conv1.gain" in has
        names = [n for n in names if n.startswith("eca_nfnet") == stem]
    return names


def infer_family_arch(sd: Mapping[str, Any]) -> ArchSpec | None:
    """The ``ArchSpec`` of one of timm's other ECA models, or None for another layout."""
    family = family_of(sd)
    if family is None or family not in OTHER_FAMILIES:
        return None
    attention = _attention(sd, family)
    counts = blocks_per_stage(sd, family)
    for name in _candidates(sd, family):
        if OTHER_FAMILIES[family].depths(name) == counts:
            return ArchSpec(name, (), head_classes(sd, "head.fc"), attention)
    names = ", ".join(n for n in list_models() if model_info(n).family == family)
    raise ConversionError(
        f"a timm {family} state_dict with {','.join(map(str, counts))} blocks per stage that is "
        f"none of eca_flax's {names}"
    )
