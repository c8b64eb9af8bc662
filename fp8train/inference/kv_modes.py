"""KV-cache modes: how keys and values are stored, written as quantizers of the core (QuantSpec).

A cache holds, per layer, batch row, KV head and slot (token), one key and one value vector of
head_dim numbers. Every quantized mode is a `QuantSpec` applied to a 2-D view of those vectors:

| mode | keys                                   | values                       | BF16 window |
|------|----------------------------------------|------------------------------|-------------|
| bf16 | bf16                                   | bf16                         | -           |
| fp8  | e4m3, one scale per token per head     | same                         | -           |
| int8 | int8 sym, one step per token per head  | same                         | -           |
| int4 | int4 sym, one step per 32 channels     | same                         | -           |
| int4_hadamard | int4 sym, g32, of the keys ROTATED  | int4 sym, g32           | -           |
|      | by a randomized Hadamard transform       |                              |             |
| kivi | uint4 asym, one (step, zero) per       | uint4 asym, one (step, zero) | newest R    |
|      | CHANNEL over G consecutive tokens      | per G channels of a token    | tokens      |
| int4_centered | uint4 asym, g32, of R (k - mu),  | uint4 asym, one (step, zero) | first token |
|      | mu = the prompt's mean key             | per 32 channels of a token   | (the sink)  |

"Per token" specs quantize the view x[tokens, head_dim] (ROW or TILE granularity along
head_dim). KIVI's keys are quantized per channel over token groups (its paper: key outliers live
in fixed channels): that is TILE(G) granularity of the TRANSPOSED view k^T[head_dim, tokens], so
the same core rule serves both (`KVQuantization.key_per_channel`). KIVI keeps the newest R tokens
unquantized and quantizes keys and values of a group of G tokens once it is older than those R
(so between R and R + G - 1 tokens are in BF16 at any time); KIVI's defaults are G = 32, R = 128.

`int4_hadamard` stores R k instead of k, R = H diag(s) / sqrt(head_dim) (fp8train/quant/hadamard.py),
and attention rotates the query the same way: R is orthogonal, so (R q) . (R k) = q . k, while R
spreads the keys' outlier channels over all channels, so a group of 32 no longer shares its step
with an outlier (QuaRot). Same bytes as int4; head_dim must be a power of 2.

`int4_centered` also subtracts mu, the mean key of the prompt (per batch row, layer and KV head,
over the prefill's valid tokens), before rotating: softmax over the keys of a head is unchanged
when one vector is subtracted from all of them (q . (k - mu) = q . k - q . mu, the same constant for
every key a query sees), so attention reads the stored codes of R (k - mu) as they are, and only
`read()` (keys in the model's basis) adds mu back. Centering removes the large per-channel offset
of real keys (the part that rotation alone spreads over every channel and that then sets every
group's range); the asymmetric uint4 groups (16 levels between the group's min and max) fit what is
left. mu is FP32, B x H x head_dim per layer, written once per sequence: `per_sequence_bytes`.

`sink` (any per-token quantized mode; `int4_centered` keeps 1 by default) keeps the first `sink`
tokens of every sequence in BF16 beside their codes: the attention sink. Most heads park a large
share of their attention on the first token, whose key is unlike the others (SmolLM2-135M: a
quarter of the other keys' norm in the deep layers), so that key's 4-bit error moves the largest
softmax term of every query. Keeping its key and value exact costs 2 x head_dim BF16 numbers per
KV head once per sequence. SmolLM2, int4_centered keys: attention-probability error (mean total
variation, benchmarks/kv_attention_error.py) 0.062 without the sink, 0.050 with one token, 0.049
with four; KIVI's per-channel keys: 0.049 (IntactKV, Liu et al. 2024, keeps the sink the same way).

Stored decode factors are FP32 (`QuantizedTensor.scale_inv`), zero points uint8: the byte counts
below include them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from fp8train.quant.config_values import parse_choice
from fp8train.quant.granularity import GranularityKind
from fp8train.quant.hadamard import hadamard_size_ok
from fp8train.quant.spec import QuantSpec

KIVI_GROUP, KIVI_RESIDUAL = 32, 128
INT4_GROUP = 32
CENTERED_SINK = 1  # int4_centered's BF16 sink tokens


class KVCacheMode(Enum):
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    INT4_HADAMARD = "int4_hadamard"
    KIVI = "kivi"
    INT4_CENTERED = "int4_centered"


def kv_cache_mode(name: str | KVCacheMode) -> KVCacheMode:
    """The enum for a config string, or ValueError naming the allowed values."""
    return parse_choice(KVCacheMode, name, "kv_cache", lower=True)


@dataclass(frozen=True)
class KVQuantization:
    """One cache mode as data: the key and value quantizers (None = BF16) and KIVI's extras."""

    mode: KVCacheMode
    key: QuantSpec | None = None
    value: QuantSpec | None = None
    key_per_channel: bool = False  # key spec applies to k^T over groups of `group` tokens
    residual: int = 0  # newest tokens kept in BF16
    rotate_keys: bool = False  # keys (and queries) pass a randomized Hadamard rotation first
    center_keys: bool = False  # keys minus the prompt's mean key (per row and KV head) before all else
    sink: int = 0  # first tokens of each sequence kept in BF16 beside their codes (attention sink)

    @property
    def quantized(self) -> bool:
        return self.key is not None

    @property
    def group(self) -> int:
        """Token group of per-channel keys (KIVI), else 0."""
        return self.key.group_size if self.key_per_channel else 0

    @property
    def channel_group(self) -> int:
        """Channels per value factor (and per key factor of per-token modes) when grouped, else 0."""
        return self.value.group_size if self.quantized and self.value.kind is GranularityKind.TILE else 0

    @property
    def window(self) -> int:
        """Slots of the BF16 ring buffer (KIVI: R + G, enough to hold a group until it is flushed)."""
        return self.residual + self.group if self.key_per_channel else 0

    def value_groups(self, head_dim: int) -> int:
        """Decode factors per value vector (and per key vector for per-token modes)."""
        spec = self.value
        if spec is None:
            return 0
        return head_dim // spec.group_size if spec.kind is GranularityKind.TILE else 1

    def check_head_dim(self, head_dim: int) -> None:
        if self.rotate_keys and not hadamard_size_ok(head_dim):
            raise ValueError(f"kv_cache={self.mode.value} rotates keys with a Hadamard transform, which needs a "
                             f"power-of-2 head_dim, got {head_dim}; choose kv_cache=int4 or kivi "
                             f"(no rotation)")
        for spec in (self.key, self.value):
            if spec is not None and spec.kind is GranularityKind.TILE and head_dim % spec.group_size:
                raise ValueError(f"kv_cache={self.mode.value} quantizes groups of {spec.group_size} channels "
                                 f"but head_dim={head_dim} is not a multiple of it; choose another kv_cache "
                                 f"mode or group size")

    def per_sequence_bytes(self, head_dim: int) -> int:
        """Bytes one KV head holds once per sequence, whatever its length: the FP32 mean key mu of
        `int4_centered` (head_dim x 4) and the BF16 key and value of each sink token."""
        return (4 * head_dim if self.center_keys else 0) + self.sink * 2 * head_dim * 2

    def bytes_per_token(self, head_dim: int, context: int | None = None) -> float:
        """Bytes one token's key AND value take in one KV head (amortized over a KIVI group).
        `context`: tokens per sequence to amortize `per_sequence_bytes` over (None: left out)."""
        if not self.quantized:
            return 2 * head_dim * 2
        total = 0.0 if context is None else self.per_sequence_bytes(head_dim) / context
        for spec, per_channel in ((self.key, self.key_per_channel), (self.value, False)):
            codes = head_dim * spec.bits / 8
            factor_bytes = 4 + (0 if spec.symmetric else 1)  # fp32 step/scale_inv (+ uint8 zero)
            if per_channel:  # one factor per channel per `group` tokens
                factors = head_dim / spec.group_size
            elif spec.kind is GranularityKind.TILE:
                factors = head_dim / spec.group_size
            else:
                factors = 1
            total += codes + factors * factor_bytes
        return total


def _int4(group: int) -> QuantSpec:
    return QuantSpec("int4", GranularityKind.TILE, group, symmetric=True)


def _kivi(group: int) -> QuantSpec:
    return QuantSpec("uint4", GranularityKind.TILE, group, symmetric=False)


def kv_quantization(mode: str | KVCacheMode, group: int | None = None,
                    residual: int | None = None, sink: int | None = None) -> KVQuantization:
    """The definition of a mode; `group` overrides INT4's / KIVI's G, `residual` KIVI's R, `sink`
    the BF16 sink tokens of a per-token quantized mode (int4_centered: 1, others: 0)."""
    quant = _mode_definition(kv_cache_mode(mode), group, residual)
    if sink is None:
        return quant
    if not isinstance(sink, int) or sink < 0:
        raise ValueError(f"kv sink (first tokens kept in BF16) must be an int >= 0, got {sink!r}")
    if sink and (not quant.quantized or quant.key_per_channel):
        raise ValueError(f"kv sink={sink} applies to the per-token quantized modes (fp8, int8, int4, "
                         f"int4_hadamard, int4_centered), not kv_cache={quant.mode.value}")
    return dataclasses.replace(quant, sink=sink)


def _mode_definition(mode: KVCacheMode, group: int | None, residual: int | None) -> KVQuantization:
    if group is not None and (not isinstance(group, int) or group < 2 or group % 2):
        raise ValueError(f"kv group size must be an even int >= 2, got {group!r}")
    if residual is not None and (not isinstance(residual, int) or residual < 0):
        raise ValueError(f"kv residual (BF16 window) must be an int >= 0, got {residual!r}")
    if mode is KVCacheMode.BF16:
        return KVQuantization(mode)
    if mode is KVCacheMode.FP8:
        spec = QuantSpec("e4m3", GranularityKind.ROW)
        return KVQuantization(mode, spec, spec)
    if mode is KVCacheMode.INT8:
        spec = QuantSpec("int8", GranularityKind.ROW, symmetric=True)
        return KVQuantization(mode, spec, spec)
    if mode in (KVCacheMode.INT4, KVCacheMode.INT4_HADAMARD):
        spec = _int4(group or INT4_GROUP)
        return KVQuantization(mode, spec, spec, rotate_keys=mode is KVCacheMode.INT4_HADAMARD)
    if mode is KVCacheMode.INT4_CENTERED:  # the key and value specs are per token (KIVI's value format)
        spec = _kivi(group or INT4_GROUP)
        return KVQuantization(mode, spec, spec, rotate_keys=True, center_keys=True, sink=CENTERED_SINK)
    spec = _kivi(group or KIVI_GROUP)
    return KVQuantization(mode, spec, spec, key_per_channel=True,
                          residual=KIVI_RESIDUAL if residual is None else residual)


def describe(quant: KVQuantization, head_dim: int) -> dict:
    """Plain values for logs and reports."""
    out = {"mode": quant.mode.value, "bytes_per_token_per_head": quant.bytes_per_token(head_dim)}
    if quant.quantized:
        out["key"] = quant.key.describe() + (" per channel over tokens" if quant.key_per_channel else "")
        out["value"] = quant.value.describe()
    if quant.key_per_channel:
        out.update(group=quant.group, residual=quant.residual)
    if quant.rotate_keys:
        out["key"] += ", after a randomized Hadamard rotation"
    if quant.center_keys:
        out["key"] = "centered on the prompt's mean key, " + out["key"]
    if quant.sink:
        out["sink"] = quant.sink
    if quant.per_sequence_bytes(head_dim):
        out["bytes_per_sequence_per_head"] = quant.per_sequence_bytes(head_dim)
    return out


def with_residual(quant: KVQuantization, residual: int) -> KVQuantization:
    return dataclasses.replace(quant, residual=residual)
