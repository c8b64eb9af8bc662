"""Tiny decoders for inference tests (milliseconds on CPU)."""

import torch

from fp8train.models import ModelConfig, MoEConfig, build_model

VOCAB = 64


def tiny_model(seed: int = 0, **overrides):
    fields = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                  max_seq_len=128)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**fields)).eval()
    with torch.no_grad():  # larger weights than the init so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def tiny_moe(seed: int = 0):
    return tiny_model(seed, moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_ffn_hidden=32,
                                          first_k_dense=1))


def random_ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


class FakeQuantizedLinear(torch.nn.Module):
    """What inference reads from fp8train.ptq's QuantizedLinear (duck typing): weight_quantized(),
    input_spec, bias, outlier_index, input_scale_inv, and the class-wide `kernel` hook."""

    kernel = None

    def __init__(self, qt, input_spec=None):
        super().__init__()
        self.qt, self.input_spec = qt, input_spec
        self.bias = self.outlier_index = self.input_scale_inv = None

    def weight_quantized(self):
        return self.qt

    def forward(self, x):
        if self.kernel is not None:
            y = type(self).kernel(self, x)
            if y is not NotImplemented:
                return y
        return (x.float() @ self.qt.dequantize().t()).to(x.dtype)


def quantize_linears(model, spec):
    """Replace every attention / MLP projection by a FakeQuantizedLinear of its RTN-quantized weight."""
    for layer in model.layers:
        for owner, names in ((layer.attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(owner, name, FakeQuantizedLinear(spec.quantize(getattr(owner, name).weight.detach())))
    return model
