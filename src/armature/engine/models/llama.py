"""The Llama family (Llama, Mistral, SmolLM, Qwen2 with q/k/v bias, Qwen3 with q/k norm).

Plain tensors, no nn.Module tree: weights are fused at load time (q|k|v into one matrix, gate|up
into another) so each layer runs four matmuls, and the lm_head runs only on the rows whose
logits the caller wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from armature.engine.attention.base import AttentionBackend
from armature.engine.config import ModelConfig
from armature.engine.models.rotary import RotaryEmbedding, apply_rotary


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


class LlamaModel:
    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], rotary: RotaryEmbedding
    ) -> None:
        self.config = config
        self.rotary = rotary
        self.eps = config.rms_norm_eps
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.embed = weights.pop("model.embed_tokens.weight")
        self.norm = weights.pop("model.norm.weight")
        head = weights.pop("lm_head.weight", None)
        if config.tie_word_embeddings or head is None:
            if head is None and not config.tie_word_embeddings:
                raise ValueError("the checkpoint has no lm_head.weight and does not tie word embeddings")
            head = self.embed
        self.lm_head = head
        self.layers = [self._fuse_layer(weights, i) for i in range(config.num_layers)]
        self.fused_ops = False

    def use_fused_ops(self) -> None:
        """Run norms, rotary + K/V store and SiLU through the Triton kernels (with the Triton
        attention backend): a few launches a layer instead of a dozen."""
        self.fused_ops = True

    def _fuse_layer(self, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."

        def take(name: str) -> torch.Tensor:
            try:
                return w.pop(p + name)
            except KeyError:
                raise ValueError(f"missing weight {p + name}") from None

        qkv = torch.cat([take(f"self_attn.{x}_proj.weight") for x in "qkv"])
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([take(f"self_attn.{x}_proj.bias") for x in "qkv"])
        qn = take("self_attn.q_norm.weight") if self.config.qk_norm else None
        kn = take("self_attn.k_norm.weight") if self.config.qk_norm else None
        return LayerWeights(
            input_norm=take("input_layernorm.weight"),
            qkv=qkv.contiguous(),
            qkv_bias=bias,
            q_norm=qn,
            k_norm=kn,
            o_proj=take("self_attn.o_proj.weight"),
            post_norm=take("post_attention_layernorm.weight"),
            gate_up=torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]).contiguous(),
            down=take("mlp.down_proj.weight"),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logit_rows: torch.Tensor | None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (float32) of ``logit_rows`` (all rows when None) of the packed tokens; with
        ``hidden``, their final-normed hidden states instead (what embedding models pool)."""
        cfg = self.config
        if self.fused_ops:
            return self._forward_fused(input_ids, positions, attn, logit_rows, hidden)
        t = input_ids.shape[0]
        eps = self.eps
        hidden_dim = (cfg.hidden_size,)
        head_dim = (cfg.head_dim,)
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        qk_heads = heads + kv_heads
        cos, sin = self.rotary.lookup(positions)
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, hidden_dim, layer.input_norm, eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            if layer.q_norm is None:
                # q and k sit side by side in qkv: rotate both heads' sets with one call.
                qk = qkv[:, : self.q_size + self.kv_size].view(t, qk_heads, cfg.head_dim)
            else:
                q = qkv[:, : self.q_size].view(t, heads, cfg.head_dim)
                q = F.rms_norm(q, head_dim, layer.q_norm, eps)
                k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, kv_heads, cfg.head_dim)
                qk = torch.cat([q, F.rms_norm(k, head_dim, layer.k_norm, eps)], dim=1)
            qk = apply_rotary(qk, cos, sin)
            v = qkv[:, self.q_size + self.kv_size :].view(t, kv_heads, cfg.head_dim)
            o = attn.forward(qk[:, :heads], qk[:, heads:], v, i)
            # Residual adds ride in the GEMM's accumulator (beta=1), in place: no separate pass.
            h.addmm_(o, layer.o_proj.t())
            x = F.rms_norm(h, hidden_dim, layer.post_norm, eps)
            gate_up = F.linear(x, layer.gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
            h.addmm_(act, layer.down.t())
        return self._logits(h, logit_rows, hidden)

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logit_rows: torch.Tensor | None,
        hidden: bool,
    ) -> torch.Tensor:
        from armature.engine.models import triton_ops as ops

        cfg = self.config
        eps = self.eps
        pool = attn.kv_pool
        out_loc = attn.out_loc  # type: ignore[attr-defined]
        # The rotary tables hold [cos, cos] and [-sin, sin]: the kernel reads one half of each.
        cos = self.rotary.cos[:, 0]
        sin = self.rotary.sin[:, 1]
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = ops.rms_norm(h, layer.input_norm, eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q = ops.rope_store(
                qkv, positions, cos, sin, layer.q_norm, layer.k_norm, eps, pool.k_buffer[i],
                pool.v_buffer[i], out_loc, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            )
            o = attn.attend(q, i)  # type: ignore[attr-defined]
            h.addmm_(o, layer.o_proj.t())
            x = ops.rms_norm(h, layer.post_norm, eps)
            h.addmm_(ops.silu_mul(F.linear(x, layer.gate_up)), layer.down.t())
        if logit_rows is not None:
            h = h[logit_rows]
        x = ops.rms_norm(h, self.norm, eps)
        return x.float() if hidden else F.linear(x, self.lm_head).float()

    def _logits(self, h: torch.Tensor, logit_rows: torch.Tensor | None, hidden: bool = False) -> torch.Tensor:
        eps = self.eps
        hidden_dim = (self.config.hidden_size,)
        if logit_rows is not None:
            h = h[logit_rows]
        h = F.rms_norm(h, hidden_dim, self.norm, eps)
        return h.float() if hidden else F.linear(h, self.lm_head).float()
