"""GLM-4.1V-9B-Thinking and GLM-4.6V-Flash (`glm4v`): the vision tower + dense GLM-4 decoder.

Decoder layer ("sandwich" norms, GLM-4-0414):
    h   = x + post_self_attn_layernorm(attn(input_layernorm(x)))
    out = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))
Attention: q/k/v with bias (packed into qkv_proj), GQA, M-RoPE on the first rotary_dim dims of
each head (interleaved pairs), no bias on o_proj. MLP: packed gate_up_proj, SwiGLU.

Tokens of many sequences are flattened: input_ids [N], positions [3, N]; attention metadata
says where each sequence starts and where its keys/values live.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from glmv.attention.metadata import AttentionMetadata, DecodeBatch
from glmv.config import ModelConfig, TextConfig
from glmv.kernels import cpu_ops
from glmv.layers.attention import Attention
from glmv.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from glmv.layers.linear import Bf16Blocks, Linear, QKVParallelLinear, RowParallelLinear
from glmv.layers.mlp import GatedMLP
from glmv.layers.norm import RMSNorm, add_rms_norm, norm_add
from glmv.layers.rotary import MRotaryEmbedding
from glmv.models.glm4v_vision import Glm4vVisionModel

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [N, rotary_dim]


ShardId = object  # e.g. "q" / "k" / "v", 0 / 1 (gate / up), (expert, "gate"|"up"|"down")


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint names matching `pattern` load into `target` (a re.sub template) as `shard`."""

    pattern: re.Pattern[str]
    target: str
    shard: Callable[[re.Match[str]], ShardId]


def rule(pattern: str, target: str, shard: object = None) -> WeightRule:
    fn = shard if callable(shard) else (lambda m, s=shard: s)
    return WeightRule(re.compile(pattern), target, fn)


# Checkpoint q/k/v projections load into the packed qkv_proj (weights and biases).
QKV_RULES = [
    rule(r"^(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias)$", r"\1.qkv_proj.\3",
         lambda m: m.group(2)),
    # Vision MLP and merger: gate/up into gate_up_proj (shard 0 = gate, 1 = up).
    rule(r"^(model\.visual\..*)\.(gate|up)_proj\.weight$", r"\1.gate_up_proj.weight",
         lambda m: 0 if m.group(2) == "gate" else 1),
]


@dataclass(frozen=True)
class LastRows:
    """Some sequences' last new tokens, the only rows the decoder's last layer computes past
    its keys and values when only their hidden states are wanted (`Glm4vTextModel.forward`'s
    `last_of`): nothing after that layer reads the other rows."""

    index: torch.Tensor  # [R] int64: each one's row among the step's N tokens
    attention: DecodeBatch | None  # their queries (AttentionMetadata.last_tokens); None: R = 0

    @classmethod
    def of(cls, meta: AttentionMetadata, seqs: list[int], device: torch.device) -> LastRows:
        index = torch.tensor(meta.last_token_rows(seqs), dtype=torch.long, device=device)
        return cls(index, meta.last_tokens(seqs) if seqs else None)


class Glm4vTextAttention(nn.Module):
    """GQA attention with M-RoPE; shared by the dense and MoE decoders."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        # Heads split over the tensor-parallel group (all of them on one device).
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias)
        self.num_heads = self.qkv_proj.num_heads  # on this rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size)
        self.attn = Attention(scale=self.head_dim**-0.5)

    def forward(self, h: torch.Tensor, rope: Rope, rotary: MRotaryEmbedding,
                meta: AttentionMetadata, last: LastRows | None = None) -> torch.Tensor:
        """h [N, hidden] -> [N, hidden]; with `last`, [R, hidden] for its rows only (every
        token's keys and values are still cached)."""
        n = h.shape[0]
        qkv = self.qkv_proj(h)  # [N, (heads + 2 * kv_heads) * head_dim], q | k | v
        qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        rotary(qkv[:, :qk_width].view(n, -1, self.head_dim), *rope)  # in place
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if last is None:
            return self.o_proj(self.attn(q, k, v, meta))
        if last.attention is None:  # no row wanted: only the cache write
            self.attn.write_cache(k, v, meta)
            return h[:0]
        return self.o_proj(self.attn(q[last.index], k, v, meta, last.attention))


def attend(attention: Glm4vTextAttention, normed: torch.Tensor, x: torch.Tensor, rope: Rope,
           rotary: MRotaryEmbedding, meta: AttentionMetadata,
           last: LastRows | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's attention over its normed input, and the residual rows its output
    adds to: all of x, or with `last` only those rows (none when R = 0)."""
    attn = attention(normed, rope, rotary, meta, last)
    return attn, x if last is None else x[last.index]


#: One layer's part of decode_layers' arguments: norms, products, widths, heads, whether gate_up
#: is in SwiGLU pairs, and the attention's scale and the norms' epsilon.
DecodeKernelArgs = tuple[list[torch.Tensor], list[list[torch.Tensor | None]], list[int],
                         list[int], bool, float, float]


class Glm4vTextDecoderLayer(nn.Module):
    """Attention and MLP, each wrapped in a pre-norm and a post-norm (GLM-4-0414)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Glm4vTextAttention(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, prepacked=True)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: Rope, rotary: MRotaryEmbedding,
                meta: AttentionMetadata, last: LastRows | None = None) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]; with `last`, only its rows [R, hidden] (LastRows)."""
        attn, x = attend(self.self_attn, self.input_layernorm(x), x, rope, rotary, meta, last)
        if not x.shape[0]:
            return x
        # h = x + post_self_attn_norm(attn); the MLP reads post_attention_norm(h)
        h, normed = add_rms_norm(attn, x, self.post_self_attn_layernorm,
                                 self.post_attention_layernorm)
        return norm_add(self.mlp(normed), h, self.post_mlp_layernorm)

    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """qkv, o, gate_up, down: the products of `decode_layers`, in its order."""
        attention, mlp = self.self_attn, self.mlp
        return attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj

    def _kernel_args(self) -> DecodeKernelArgs | None:
        """This layer's part of decode_layers' arguments, or None where the layer does not fit
        it: a product without glmv's blocks, tensor parallelism (the row-parallel products
        all-reduce), norms of other dtypes or epsilons, another attention backend."""
        attention, mlp = self.self_attn, self.mlp
        linears = self.linears()
        packed = [linear.packed for linear in linears]
        norms = [self.input_layernorm, self.post_self_attn_layernorm,
                 self.post_attention_layernorm, self.post_mlp_layernorm]
        found = [None if p is None else p.kernel_args() for p in packed]
        products = [p for p in found if p is not None]
        if (len(products) != len(linears)
                or attention.o_proj.tp.size > 1 or mlp.down_proj.tp.size > 1
                or attention.attn.backend != "torch_sdpa"
                or any(n.eps != norms[0].eps or n.weight.dtype is not torch.bfloat16
                       for n in norms)):
            return None
        # gate_up in SwiGLU pairs: one pass gives the activation, the MLP's width wide
        swiglu = isinstance(packed[2], Bf16Blocks) and packed[2].swiglu
        widths = [p.out_features for p in packed]  # type: ignore[union-attr]
        if swiglu:
            widths[2] //= 2
        return ([n.weight for n in norms], products, widths,
                [attention.num_heads, attention.num_kv_heads, attention.head_dim], swiglu,
                attention.attn.scale, norms[0].eps)


@dataclass
class DecodeStack:
    """decode_layers' arguments for every layer, flat, with what they were made from: the
    packed weights and KV caches they hold (made again when any of those is replaced)."""

    made_from: list[object]
    norms: list[torch.Tensor]
    products: list[torch.Tensor | None]
    product_sizes: list[int]
    widths: list[int]
    heads: list[int]
    kv_caches: list[torch.Tensor]
    swiglu: bool
    scale: float
    eps: float


class Glm4vTextModel(nn.Module):
    """Embeddings, decoder layers and final norm; layer class chosen by the subclass."""

    def __init__(self, cfg: TextConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section,
                                           cfg.rope_style)
        self._stack: DecodeStack | None = None
        # each layer's products and attention, looked up once (module attribute lookups cost
        # ~1 us each; decode_layers' arguments are checked against them every step)
        self._holders: tuple[list[Linear], list[Attention]] | None = None

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, last_of: list[int] | None = None) -> torch.Tensor:
        """inputs_embeds [N, hidden], positions [3, N] -> hidden states [N, hidden]; with
        `last_of` (sequence indices), only the hidden states of those sequences' last new
        tokens, [len(last_of), hidden] in that order.

        With `last_of` and a KV cache the last layer computes those rows only past its keys
        and values (its queries, attention output, MLP): nothing reads the others, and a
        prefill step's last layer costs a few rows instead of every token."""
        rope = self.rotary_emb.cos_sin(positions, inputs_embeds.dtype)
        h = self._decode_stack(inputs_embeds, rope, meta)
        last: LastRows | None = None
        tail = self.layers[-1].self_attn
        if (h is None and last_of is not None and len(last_of) < inputs_embeds.shape[0]
                and meta.uses_cache and isinstance(tail, Glm4vTextAttention)
                and tail.attn.kv_cache is not None):
            last = LastRows.of(meta, last_of, inputs_embeds.device)
        if h is None:
            h = inputs_embeds
            for i, layer in enumerate(self.layers):
                h = layer(h, rope, self.rotary_emb, meta,
                          last if i == len(self.layers) - 1 else None)
        if last_of is not None and last is None:
            h = h[meta.last_token_rows(last_of)]
        return self.norm(h)

    def _decode_stack(self, x: torch.Tensor, rope: Rope,
                      meta: AttentionMetadata) -> torch.Tensor | None:
        """Every layer in one `torch.ops.glmv.decode_layers` call (the kernels each layer's
        forward calls, in the same order, so the same bits, without the Python between them)
        when the step only decodes, on a bf16 CPU with glmv's packed weights and one device;
        else None."""
        ops = cpu_ops(x)
        if ops is None:
            return None
        batch = meta.decode_batch()
        if (batch is None or len(batch.seqs) != x.shape[0] or rope[0].dtype is not x.dtype
                or meta.block_tables is None or meta.slot_mapping is None):
            return None
        stack = self._stack_args()
        if stack is None or stack.kv_caches[0].dtype is not x.dtype:
            return None
        return ops.decode_layers(x, stack.norms, stack.products, stack.product_sizes,
                                 stack.widths, *rope, self.rotary_emb.interleaved, stack.heads,
                                 stack.kv_caches, meta.slot_mapping, meta.block_tables,
                                 batch.seq_idx, batch.token_idx, batch.seq_lens, stack.scale,
                                 stack.eps, stack.swiglu)

    def _made_from(self, layers: list[Glm4vTextDecoderLayer]) -> list[object]:
        """What decode_layers' arguments are made from: each layer's packed weights and cache."""
        if self._holders is None:
            self._holders = ([linear for layer in layers for linear in layer.linears()],
                             [layer.self_attn.attn for layer in layers])
        linears, attentions = self._holders
        return [linear.packed for linear in linears] + [a.kv_cache for a in attentions]

    def _stack_args(self) -> DecodeStack | None:
        """decode_layers' arguments, made once for the weights and caches they hold; None
        where a layer does not fit the fused kernel (or has no cache yet)."""
        layers = [layer for layer in self.layers if isinstance(layer, Glm4vTextDecoderLayer)]
        if len(layers) != len(self.layers):
            return None  # the MoE decoder
        made = self._made_from(layers)
        stack = self._stack
        if stack is not None and len(made) == len(stack.made_from) and all(
                a is b for a, b in zip(made, stack.made_from, strict=True)):
            return stack
        self._stack = None
        found = [layer._kernel_args() for layer in layers]
        args = [a for a in found if a is not None]
        caches = [c for c in (layer.self_attn.attn.kv_cache for layer in layers) if c is not None]
        if len(args) != len(layers) or len(caches) != len(layers):
            return None
        first = args[0]
        if any(a[3:] != first[3:] for a in args):
            return None  # heads, SwiGLU pairs, scale and eps shared by every layer
        stack = DecodeStack(made, [], [], [], [], first[3], caches, first[4], first[5], first[6])
        for norms, products, widths, *_ in args:
            stack.norms.extend(norms)
            for product in products:
                stack.products.extend(product)
                stack.product_sizes.append(len(product))
            stack.widths.extend(widths)
        self._stack = stack
        return stack


class Glm4vModel(nn.Module):
    """Container matching the checkpoint prefix `model.`: `visual` and `language_model`."""

    def __init__(self, cfg: ModelConfig, language_model: Glm4vTextModel) -> None:
        super().__init__()
        self.visual = Glm4vVisionModel(cfg.vision)
        self.language_model = language_model


class Glm4vForConditionalGeneration(nn.Module):
    """Vision tower + decoder + LM head. Names follow the checkpoint (model.visual, ...)."""

    weight_rules: list[WeightRule] = QKV_RULES

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        text = cfg.text
        layers = [self.make_layer(text, i) for i in range(text.num_hidden_layers)]
        self.model = Glm4vModel(cfg, Glm4vTextModel(text, layers))
        self.lm_head = ParallelLMHead(text.hidden_size, text.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @staticmethod
    def make_layer(cfg: TextConfig, layer_idx: int) -> nn.Module:
        return Glm4vTextDecoderLayer(cfg)

    @property
    def visual(self) -> Glm4vVisionModel:
        return self.model.visual

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def encode_vision(self, pixels: torch.Tensor,
                      grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels [P, patch_dim] of images and/or video frame pairs -> [P / 4, hidden]."""
        return self.model.visual(pixels, grids)

    def embed_with_vision(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None,
                          vision_mask: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with rows where vision_mask is true replaced by vision_embeds."""
        embeds = self.embed_tokens(input_ids)  # a new tensor: safe to write into
        if vision_embeds is not None and vision_mask is not None:
            count = int(vision_mask.sum())
            if count != vision_embeds.shape[0]:
                raise ValueError(f"{count} placeholder tokens but {vision_embeds.shape[0]} "
                                 "vision embeddings")
            embeds[vision_mask] = vision_embeds.to(embeds.dtype)
        return embeds

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, last_of: list[int] | None = None) -> torch.Tensor:
        """Hidden states of every token, or of the last new token of each `last_of` sequence
        (Glm4vTextModel.forward)."""
        return self.model.language_model(inputs_embeds, positions, meta, last_of)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, hidden] (usually the last token of each sequence) -> [M, vocab]."""
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, hidden] -> int64 [M]: the argmax of compute_logits(hidden), row by row
        (without the logits where the LM head can: ParallelLMHead.greedy)."""
        return self.lm_head.greedy(hidden)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds (its share under tensor parallelism): the KV cache's width."""
        layer = self.model.language_model.layers[0]
        return int(layer.self_attn.num_kv_heads)  # type: ignore[union-attr, arg-type]

    def kv_cache_layers(self) -> list[Attention]:
        """The attention op of every decoder layer, in order (the runner binds caches to them)."""
        return [m for m in self.model.language_model.modules() if isinstance(m, Attention)]
