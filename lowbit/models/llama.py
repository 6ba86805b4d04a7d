"""Dense decoder: Llama 2/3/3.x, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.config import ModelConfig
from lowbit.kernels import dispatch
from lowbit.layers.attention import Attention, AttentionMetadata, KVCache
from lowbit.layers.embedding import VocabEmbedding
from lowbit.layers.linear import MergedColumnLinear, QKVLinear, ReplicatedLinear
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding
from lowbit.quant.spec import QuantPlan


class DecoderAttention(nn.Module):
    """Self-attention block: fused qkv → (q/k norm) → rotary → paged attention → o_proj."""

    def __init__(self, cfg: ModelConfig, plan: QuantPlan, prefix: str, layer_id: int, dtype):
        super().__init__()
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size, self.head_dim = H * D, Hkv * D, D
        sources = [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, D, H, Hkv, bias=cfg.attention_bias, params_dtype=dtype,
            prefix=f"{prefix}.qkv_proj", scheme=plan.scheme_for(f"{prefix}.qkv_proj", sources),
        )  # fmt: skip
        self.o_proj = ReplicatedLinear(
            H * D, cfg.hidden_size, bias=False, params_dtype=dtype, prefix=f"{prefix}.o_proj",
            scheme=plan.scheme_for(f"{prefix}.o_proj", [f"{prefix}.o_proj"]),
        )  # fmt: skip
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.attn = Attention(H, Hkv, D, layer_id)

    def forward(self, x, positions, rotary, meta, cache):
        """x (T, hidden) → (T, hidden)."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2·Hkv)·D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, -1, self.head_dim)  # (T, H, D)
        k = k.reshape(T, -1, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(T, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # rotary goes with the KV store (one kernel on CUDA)
        return self.o_proj(self.attn(q, k, v, rotary, positions, meta, cache))


class DecoderMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)) with gate and up fused."""

    def __init__(self, cfg: ModelConfig, plan: QuantPlan, prefix: str, dtype):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; only 'silu' is")
        I = cfg.intermediate_size  # noqa: E741
        sources = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = MergedColumnLinear(
            cfg.hidden_size, [I, I], bias=False, params_dtype=dtype,
            prefix=f"{prefix}.gate_up_proj",
            scheme=plan.scheme_for(f"{prefix}.gate_up_proj", sources),
        )  # fmt: skip
        self.down_proj = ReplicatedLinear(
            I, cfg.hidden_size, bias=False, params_dtype=dtype, prefix=f"{prefix}.down_proj",
            scheme=plan.scheme_for(f"{prefix}.down_proj", [f"{prefix}.down_proj"]),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """x (T, hidden) → (T, hidden)."""
        h = self.gate_up_proj(x)  # (T, 2I)
        # a W8A8 down_proj gets its input quantized by SwiGLU (`Linear.input_quant`)
        return self.down_proj(dispatch.silu_mul(h, self.down_proj.input_quant()))  # (T, I)


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual is carried separately so norms can fuse the add."""

    def __init__(self, cfg: ModelConfig, plan: QuantPlan, layer_id: int, dtype):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.self_attn = DecoderAttention(cfg, plan, f"{prefix}.self_attn", layer_id, dtype)
        self.mlp = DecoderMLP(cfg, plan, f"{prefix}.mlp", dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, residual, positions, rotary, meta, cache):
        """Returns (hidden, residual), both (T, hidden)."""
        # W8A8 consumers get their inputs quantized by the norm (`Linear.input_quant`)
        quant = self.self_attn.qkv_proj.input_quant()
        if residual is None:
            residual, x = x, self.input_layernorm(x, quant=quant)
        else:
            x, residual = self.input_layernorm(x, residual, quant=quant)
        x = self.self_attn(x, positions, rotary, meta, cache)
        quant = self.mlp.gate_up_proj.input_quant()
        x, residual = self.post_attention_layernorm(x, residual, quant=quant)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, plan: QuantPlan, dtype):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, plan, i, dtype) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """The causal LM; also serves Mistral, Qwen2 and Qwen3, which differ only in config flags."""

    # (fused param, checkpoint module, shard id): checkpoint names that land in fused layers.
    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, cfg: ModelConfig, plan: QuantPlan, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, plan, dtype)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = ReplicatedLinear(
                cfg.hidden_size, cfg.vocab_size, bias=False, params_dtype=dtype, prefix="lm_head",
                scheme=plan.scheme_for("lm_head", ["lm_head"]),
            )  # fmt: skip

    def skip_tensor(self, name: str) -> bool:
        """Checkpoint tensors that are derivable and ignored (rotary caches, a tied lm_head)."""
        if "rotary_emb.inv_freq" in name:
            return True
        return self.config.tie_word_embeddings and name == "lm_head.weight"

    def forward(
        self, ids: Tensor, positions: Tensor, meta: AttentionMetadata, caches: list[KVCache]
    ) -> Tensor:
        """ids, positions (T,) → final hidden states (T, hidden)."""
        x, residual = self.model.embed_tokens(ids), None
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x, residual = layer(x, residual, positions, self.rotary, meta, cache)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) → float32 logits (N, vocab)."""
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
