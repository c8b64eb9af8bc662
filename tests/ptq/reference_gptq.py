"""An independent, line-by-line transcription of IST-DASLab/gptq @2d65066 (`Quantizer.find_params`
with perchannel=True, `quantize`, `GPTQ.add_batch`, `GPTQ.fasterquant`) for tests: the reference
semantics, written in the reference's own style (unsigned codes, zero = (maxq + 1) / 2 when
symmetric, per-block copies W1/Q1/Err1, the group grid read from the full W), returning the integer
codes as well as Q. It imports nothing from fp8train.ptq, so a change there cannot hide here.
"""

import copy
import math

import torch


class RefQuantizer:
    def __init__(self, bits, sym):
        self.maxq, self.sym = torch.tensor(2 ** bits - 1), sym

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            neg = xmin < 0
            if torch.any(neg):
                xmin[neg] = -xmax[neg]
        empty = (xmin == 0) & (xmax == 0)
        xmin[empty], xmax[empty] = -1, +1
        self.scale = (xmax - xmin) / self.maxq
        self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2) if self.sym else torch.round(-xmin / self.scale)
        self.scale, self.zero = self.scale.reshape(-1, 1), self.zero.reshape(-1, 1)

    def codes(self, x):
        return torch.clamp(torch.round(x / self.scale) + self.zero, 0, self.maxq)

    def quantize(self, x):
        return self.scale * (self.codes(x) - self.zero)


def ref_hessian(batches):
    """GPTQ.add_batch over [B, T, K] batches."""
    H, n = None, 0
    for inp in batches:
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        H = torch.zeros(inp.shape[0], inp.shape[0]) if H is None else H
        H *= n / (n + tmp)
        n += tmp
        inp = math.sqrt(2 / n) * inp.float()
        H += inp.matmul(inp.t())
    return H


def ref_fasterquant(W, H, bits, sym, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    """Returns (Q dequantized [N, K], integer codes [N, K] in 0..2^bits-1, total loss)."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    quantizer = RefQuantizer(bits, sym)
    quantizer.find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            q = copy.deepcopy(quantizer)
            q.find_params(W[:, i:(i + groupsize)])
            groups.append(q)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses, Q, C = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, C1, Err1, Losses1 = (torch.zeros_like(W1) for _ in range(4))
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = quantizer.quantize(w.unsqueeze(1)).flatten()
            C1[:, i] = quantizer.codes(w.unsqueeze(1)).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2], C[:, i1:i2], Losses[:, i1:i2] = Q1, C1, Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q, C = Q[:, invperm], C[:, invperm]
    return Q, C, float(torch.sum(Losses))
