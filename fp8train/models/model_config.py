"""ModelConfig: the shape of a decoder (dense or MoE), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from fp8train.models.moe import MoEConfig


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    moe: MoEConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide "
                             f"d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                             f"n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.d_model / n_heads = head_dim={self.head_dim} must be "
                             f"even for RoPE")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a number > 0, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, "
                             f"got {self.tie_embeddings!r}")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe is None:
            return
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"ModelConfig.moe must be a MoEConfig or None, got {type(self.moe)}")
        if self.moe.first_k_dense > self.n_layers:
            raise ValueError(f"MoEConfig.first_k_dense={self.moe.first_k_dense} must be <= "
                             f"n_layers={self.n_layers}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.moe is not None and layer_index >= self.moe.first_k_dense
