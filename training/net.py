"""The masked denoising window autoencoder (torch) and the graph exported to ONNX for scoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

PAD, UNK, MASK = 0, 1, 2  # special token ids shared with agent.model (the sidecar names them)


@dataclass(frozen=True)
class NetConfig:
    vocab_size: int
    n: int
    programs: int
    hidden: int = 128
    bottleneck: int = 48
    dim: int = 24
    passes: int = 4
    dropout: float = 0.1
    # None: `passes` passes score every position. An int: one pass hides only this position and scores it
    # alone (n-1 = predict the newest syscall from the n-1 before it), which is passes x cheaper at runtime
    target: int | None = None

    @property
    def scoring_passes(self) -> int:
        return 1 if self.target is not None else self.passes

    def as_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


class MaskedWindowAE(nn.Module):
    """Window (some positions hidden) + program -> a distribution over the syscall at every position.

    The first layer is a linear map of the one-hot window, written as one embedding per (position, token)
    so that it costs n lookups instead of a matrix product. The program adds a learned vector before
    and after the bottleneck, which is how one model holds a "normal" per program.
    """

    offsets: torch.Tensor

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_at = nn.Embedding(cfg.n * cfg.vocab_size, cfg.hidden)
        self.program_in = nn.Embedding(cfg.programs, cfg.hidden)
        self.program_out = nn.Embedding(cfg.programs, cfg.hidden)
        self.squeeze = nn.Linear(cfg.hidden, cfg.bottleneck)
        self.expand = nn.Linear(cfg.bottleneck, cfg.hidden)
        self.position_out = nn.Parameter(torch.randn(cfg.n, cfg.hidden, cfg.dim) * cfg.hidden**-0.5)
        self.position_bias = nn.Parameter(torch.zeros(cfg.n, cfg.dim))
        self.to_token = nn.Linear(cfg.dim, cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = nn.GELU()
        self.register_buffer("offsets", torch.arange(cfg.n, dtype=torch.long) * cfg.vocab_size, persistent=False)

    def encode(self, tokens: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
        """tokens [..., n], program [...] -> the decoder's hidden state [..., hidden]."""
        return self.decode_hidden(self.token_at(tokens + self.offsets).sum(-2) + self.program_in(program), program)

    def decode_hidden(self, first: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
        """The first layer's sum [..., hidden] through the bottleneck, conditioned on the program again."""
        z = self.act(self.squeeze(self.drop(self.act(first))))
        return self.act(self.expand(z) + self.program_out(program))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, n, V] at every position (training)."""
        out = torch.einsum("bh,nhd->bnd", self.drop(hidden), self.position_out) + self.position_bias
        return self.to_token(self.act(out))

    def logits_at(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, V] at one position (training a target model)."""
        out = self.drop(hidden) @ self.position_out[position] + self.position_bias[position]
        return self.to_token(self.act(out))


class TargetScoringGraph(nn.Module):
    """The one-pass graph of a target model: tokens [B, n], program [B] -> nll [B, n], zero but at the target.

    The target position's input is swapped for MASK; only that position is decoded.
    """

    keep: torch.Tensor
    only_target: torch.Tensor

    def __init__(self, net: MaskedWindowAE) -> None:
        super().__init__()
        cfg = net.cfg
        if cfg.target is None or not 0 <= cfg.target < cfg.n:
            raise ValueError(f"target {cfg.target} is not a position of n={cfg.n}")
        self.net = net
        self.target = cfg.target
        keep = torch.ones(cfg.n, dtype=torch.long)
        keep[cfg.target] = 0
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("only_target", (1 - keep).to(torch.float32), persistent=False)

    def forward(self, tokens: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
        net, t = self.net, self.target
        inputs = tokens * self.keep + MASK * (1 - self.keep)
        h = net.encode(inputs, program)
        logp = torch.log_softmax(net.logits_at(h, t), dim=-1)  # [B, V]
        target = tokens[:, t]
        nll = -torch.gather(logp, 1, target.unsqueeze(-1))  # [B, 1]
        return nll * self.only_target * (tokens != PAD).to(nll.dtype)


def scoring_graph(net: MaskedWindowAE) -> nn.Module:
    """The graph that ships for ``net``: one target pass or ``passes`` masked passes."""
    return TargetScoringGraph(net) if net.cfg.target is not None else ScoringGraph(net)


class ScoringGraph(nn.Module):
    """What ships in the .onnx: tokens [B, n] int64, program [B] int64 -> nll [B, n] float32.

    ``passes`` deterministic passes each hide every ``passes``-th position (offset by the pass); a
    position's NLL is taken in the pass that hid it, so every position is scored exactly once and only
    hidden positions are decoded. PAD positions score 0.
    """

    hidden_positions: torch.Tensor
    mask: torch.Tensor
    order: torch.Tensor

    def __init__(self, net: MaskedWindowAE) -> None:
        super().__init__()
        cfg = net.cfg
        if cfg.n % cfg.passes:
            raise ValueError(f"n={cfg.n} must be a multiple of passes={cfg.passes}")
        self.net = net
        self.passes = cfg.passes
        per_pass = cfg.n // cfg.passes
        # hidden[p, q] = the q-th position hidden in pass p
        hidden = torch.arange(per_pass).unsqueeze(0) * cfg.passes + torch.arange(cfg.passes).unsqueeze(1)
        mask = torch.zeros(cfg.passes, cfg.n, dtype=torch.bool)
        mask.scatter_(1, hidden, True)
        self.register_buffer("hidden_positions", hidden, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        # inverse permutation: position i was decoded as flat index order[i] of the [passes*per_pass] outputs
        order = torch.empty(cfg.n, dtype=torch.long)
        order[hidden.reshape(-1)] = torch.arange(cfg.n)
        self.register_buffer("order", order, persistent=False)

    def forward(self, tokens: torch.Tensor, program: torch.Tensor) -> torch.Tensor:
        net, cfg = self.net, self.net.cfg
        batch, passes, per_pass = tokens.shape[0], cfg.passes, cfg.n // cfg.passes
        flat = self.hidden_positions.reshape(-1)
        # the first layer is a sum over positions: compute it once, then per pass swap the hidden
        # positions' terms for MASK's (instead of re-embedding the window once per pass)
        emb = net.token_at(tokens + net.offsets)  # [B, n, hidden]
        full = emb.sum(1) + net.program_in(program)  # [B, hidden]
        hidden_terms = emb[:, flat].reshape(batch, passes, per_pass, -1).sum(2)  # [B, P, hidden]
        mask_terms = net.token_at.weight[net.offsets[flat] + MASK].reshape(passes, per_pass, -1).sum(1)
        first = full.unsqueeze(1) - hidden_terms + mask_terms.unsqueeze(0)  # [B, P, hidden]
        h = net.decode_hidden(first, program.unsqueeze(1))  # [B, P, hidden]
        # decode only the hidden positions of each pass: one batched MatMul per pass
        w = net.position_out[self.hidden_positions].permute(0, 2, 1, 3).reshape(passes, cfg.hidden, -1)
        out = torch.matmul(h.transpose(0, 1), w).reshape(passes, batch, per_pass, cfg.dim)
        out = out + net.position_bias[self.hidden_positions].unsqueeze(1)  # [P, B, Q, dim]
        logp = torch.log_softmax(net.to_token(net.act(out)), dim=-1)  # [P, B, Q, V]
        target = tokens[:, flat].reshape(batch, passes, per_pass).transpose(0, 1)  # [P, B, Q]
        nll = -torch.gather(logp, 3, target.unsqueeze(-1)).squeeze(-1)
        nll = nll.transpose(0, 1).reshape(batch, cfg.n)[:, self.order]  # back to window order
        return nll * (tokens != PAD).to(nll.dtype)
