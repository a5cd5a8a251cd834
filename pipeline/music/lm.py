"""A lean MusicGen decode loop: the whole path from text to audio codes, readable in one file.

transformers' `generate` spends most of a CPU step outside the model (logits processors, cache bookkeeping,
generic masks) and reads fp32 weights. This loop, in the manner of gpt-fast, keeps only what a step needs:

* weights repacked once: fused Q/K/V, fused LM heads, low-bit weights (`quantize.PackedLinear`); the reference
  transformers modules are dropped afterwards to free their memory;
* with the native kernel, every layer of a step runs in one C call (`kernels/lowbit_matmul.c`: layer norms,
  5-bit matrix products, attention over an int8 KV cache, GELU, residuals); otherwise the same step in PyTorch ops;
* a static KV cache sized for the request, written in place; no masks (a step attends to positions ≤ its own);
* the text's cross-attention keys and values computed once per request, and cross-attention run only for the
  conditional row of classifier-free guidance: the unconditional row attends to a fully masked, all-zero text,
  which contributes exactly zero (as in transformers and audiocraft);
* sampling with its own `torch.Generator`, so a seed gives the same codes on every run and in every thread.

`FastMusicLM.frames()` yields audio codes as soon as each frame is complete (the delay pattern offsets
codebook k by k steps), which is what streaming playback consumes.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import Cancelled
from ..memory import release_file_pages, trim
from .native import LAYER_MATRICES
from .quantize import ACTIVATION_DTYPE, pack_linear, resolve_format
from .request import Sampling


class LayerWeights:
    """One decoder layer repacked: its layer norms and `PackedLinear` matrices (`LAYER_MATRICES`, plus the
    cross-attention keys and values, which run once per request on the text)."""

    __slots__ = ("ln1", "ln2", "ln3", "cross_k", "cross_v") + LAYER_MATRICES

    def matrices(self) -> list:
        return [getattr(self, name) for name in LAYER_MATRICES + ("cross_k", "cross_v")]


def codebook_delays(num_codebooks: int, channels: int) -> list[int]:
    """MusicGen's delay pattern: codebook k is k steps behind the first (stereo codebooks come in interleaved
    L/R pairs that share a delay), so a frame is complete `max(delays)` steps after its first code."""
    return [k // 2 if channels == 2 else k for k in range(num_codebooks)]


def _ln(module: torch.nn.LayerNorm, dtype) -> tuple:
    return (module.normalized_shape, module.weight.detach().to(dtype), module.bias.detach().to(dtype), module.eps)


class FastMusicLM:
    """MusicGen's language model over audio codes, rebuilt for decoding from a loaded
    `MusicgenForConditionalGeneration`. `weights` is int5 | int4 | int8 | bf16 | fp16 | fp32 (see
    `quantize.resolve_format` for the format each becomes on this machine); `fused_layers=False` keeps the
    per-operation PyTorch step even where the native kernel could run whole layers (tests compare the two)."""

    def __init__(self, model, weights: str = "int5", device: str = "cpu", keep_reference: bool = False,
                 cache_dir: str | None = None, native_kernels: bool = True, fused_layers: bool = True):
        self.device = device
        self.format, kernel = resolve_format(weights, device, cache_dir, native_kernels)
        self.dtype = ACTIVATION_DTYPE[self.format]
        # keys and values in bf16 halve the cache (and what attention reads) except in the fp32 reference
        self.cache_dtype = self.dtype if self.format == "fp32" or device != "cpu" else torch.bfloat16
        config = model.decoder.config
        decoder = model.decoder.model.decoder
        self.num_codebooks = config.num_codebooks
        self.channels = getattr(config, "audio_channels", 1)
        self.vocab_size = config.vocab_size
        self.pad_id = config.pad_token_id
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.max_positions = decoder.embed_positions.weights.shape[0]

        def pack(*linears):
            return pack_linear(torch.cat([m.weight.detach().float() for m in linears], dim=0), self.format, device,
                               kernel)

        self.embeddings = torch.stack([e.weight.detach() for e in decoder.embed_tokens]).to(device, self.dtype)
        self._codebook_index = torch.arange(self.num_codebooks, device=device)
        self.positions = decoder.embed_positions.weights.detach().to(device, self.dtype)
        self.layers = []
        for block in decoder.layers:
            layer = LayerWeights()
            attn, cross = block.self_attn, block.encoder_attn
            layer.ln1 = _ln(block.self_attn_layer_norm, self.dtype)
            layer.qkv = pack(attn.q_proj, attn.k_proj, attn.v_proj)
            layer.out = pack(attn.out_proj)
            layer.ln2 = _ln(block.encoder_attn_layer_norm, self.dtype)
            layer.cross_q, layer.cross_out = pack(cross.q_proj), pack(cross.out_proj)
            layer.cross_k, layer.cross_v = pack(cross.k_proj), pack(cross.v_proj)
            layer.ln3 = _ln(block.final_layer_norm, self.dtype)
            layer.fc1, layer.fc2 = pack(block.fc1), pack(block.fc2)
            self.layers.append(layer)
            if not keep_reference:  # the packed copy is all that is read from now on
                release_file_pages(p for name, p in block.named_parameters() if "layer_norm" not in name)
        self.final_ln = _ln(decoder.layer_norm, self.dtype)
        self.heads_linear = pack(*model.decoder.lm_heads)
        if not keep_reference:
            release_file_pages([*model.decoder.lm_heads.parameters(), *decoder.embed_tokens.parameters()])
        # with the native kernel and shapes it tiles, a whole layer runs as one C call (no per-op Python overhead)
        self._kernel = kernel
        self._fused = None
        self.activation = config.activation_function
        if fused_layers and kernel is not None and self.activation == "gelu" and \
                all(getattr(layer, name).native for layer in self.layers for name in LAYER_MATRICES):
            from .native import MAX_HEAD_DIM, FusedLayer

            if self.head_dim <= MAX_HEAD_DIM:
                self._fused = [FusedLayer([getattr(layer, name).packed for name in LAYER_MATRICES],
                                          [block.self_attn_layer_norm.weight, block.self_attn_layer_norm.bias,
                                           block.encoder_attn_layer_norm.weight, block.encoder_attn_layer_norm.bias,
                                           block.final_layer_norm.weight, block.final_layer_norm.bias],
                                          block.final_layer_norm.eps, self.heads)
                               for layer, block in zip(self.layers, decoder.layers)]

        # the text side stays in transformers: T5 runs once per request
        self.text_encoder = model.text_encoder
        self.enc_to_dec_proj = getattr(model, "enc_to_dec_proj", None)
        # what one step reads (the text's keys and values are computed once per request, not per step)
        self.weight_bytes = sum(getattr(layer, name).nbytes for layer in self.layers for name in LAYER_MATRICES)
        self.weight_bytes += self.heads_linear.nbytes
        if not keep_reference:
            model.decoder = _Detached(config)  # frees ~1.7 GB of fp32 decoder weights for musicgen-small
            trim()

    # -- one request ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text_encoder(input_ids=input_ids.to(self.device),
                                   attention_mask=attention_mask.to(self.device)).last_hidden_state
        if self.enc_to_dec_proj is not None:
            hidden = self.enc_to_dec_proj(hidden.to(self.enc_to_dec_proj.weight.dtype))
        hidden = hidden * attention_mask.to(self.device)[..., None].to(hidden.dtype)
        return hidden.to(self.dtype), attention_mask.to(self.device).bool()

    def _cross_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the text for every layer's cross-attention: (1, H, T, Dh), or (H, T, Dh) fp32 for
        the fused C layers."""
        t = text.shape[1]
        flat = text.reshape(-1, self.hidden)
        kv = []
        for layer in self.layers:
            k = layer.cross_k(flat).view(1, t, self.heads, self.head_dim).transpose(1, 2)
            v = layer.cross_v(flat).view(1, t, self.heads, self.head_dim).transpose(1, 2)
            if self._fused is not None:
                kv.append((k[0].float().contiguous(), v[0].float().contiguous()))
            else:
                kv.append((k.to(self.cache_dtype).contiguous(), v.to(self.cache_dtype).contiguous()))
        return kv

    def _new_caches(self, batch: int, length: int, cross, cross_mask):
        """A static KV cache per layer, sized for the request: int8, bound with the layers into a FusedStack for
        the C path; else cache_dtype tensors."""
        if self._fused is not None:
            from .native import FusedStack

            caches = [self._fused[0].new_cache(batch, self.heads, length, self.head_dim) for _ in self.layers]
            return FusedStack(self._kernel, self._fused, caches, cross, cross_mask)
        shape = (batch, self.heads, length, self.head_dim)
        return [(torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
                 torch.zeros(shape, dtype=self.cache_dtype, device=self.device)) for _ in self.layers]

    def _cross_mask(self, text_mask: torch.Tensor) -> torch.Tensor:
        """Which text positions cross-attention may see: SDPA's boolean mask, or bytes for the fused C layers."""
        if self._fused is not None:
            return text_mask.reshape(-1).to(torch.uint8).contiguous()
        return text_mask[:, None, None, :]

    def _step(self, tokens: torch.Tensor, pos: int, caches, cross, cross_mask) -> torch.Tensor:
        """tokens (B, K) at position `pos` → logits (B, K, V) for position pos + 1."""
        b = tokens.shape[0]
        h, d = self.heads, self.head_dim
        x = self.embeddings[self._codebook_index, tokens].sum(dim=1)
        x = x * self.embed_scale + self.positions[pos]
        if self._fused is not None:
            x = x.contiguous()
            caches(x, pos)  # a FusedStack: every layer in one C call
            x = F.layer_norm(x, *self.final_ln)
            return self.heads_linear(x).view(b, self.num_codebooks, self.vocab_size).float()
        for layer, (k_cache, v_cache), (ck, cv) in zip(self.layers, caches, cross):
            y = F.layer_norm(x, *layer.ln1)
            q, k, v = layer.qkv(y).view(b, 3, h, d).unbind(1)
            k_cache[:, :, pos] = k
            v_cache[:, :, pos] = v
            a = F.scaled_dot_product_attention(q.unsqueeze(2).to(self.cache_dtype), k_cache[:, :, : pos + 1],
                                               v_cache[:, :, : pos + 1]).to(self.dtype)
            x = x + layer.out(a.reshape(b, h * d))
            # cross-attention: conditional row only (row 0); the unconditional row's contribution is zero
            y = F.layer_norm(x[:1], *layer.ln2)
            a = F.scaled_dot_product_attention(layer.cross_q(y).view(1, h, 1, d).to(self.cache_dtype), ck, cv,
                                               attn_mask=cross_mask).to(self.dtype)
            x = torch.cat([x[:1] + layer.cross_out(a.reshape(1, h * d)), x[1:]]) if b > 1 else \
                x + layer.cross_out(a.reshape(1, h * d))
            y = F.layer_norm(x, *layer.ln3)
            x = x + layer.fc2(F.gelu(layer.fc1(y)) if self.activation == "gelu" else
                              _activation(self.activation)(layer.fc1(y)))
        x = F.layer_norm(x, *self.final_ln)
        return self.heads_linear(x).view(b, self.num_codebooks, self.vocab_size).float()

    @property
    def fused(self) -> bool:
        """Whether a step runs every layer in one native call (else per-operation PyTorch)."""
        return self._fused is not None

    def window_limits(self, window: int | None = None, stride: int | None = None) -> tuple[int, int]:
        """(frames per window, new frames per later window) for long clips, as audiocraft's `extend_stride`: a
        window holds at most what the model's positions allow; each later window re-reads the previous window's
        last (window - stride) frames as its audio prompt."""
        delay = max(codebook_delays(self.num_codebooks, self.channels))
        most = self.max_positions - delay - 1
        window = most if window is None else min(int(window), most)
        stride = window if stride is None else int(stride)
        if window < 2 or not 1 <= stride <= window:
            raise ValueError(f"a window of {window} frames cannot advance by {stride}")
        return window, stride

    @torch.inference_mode()
    def frames(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_frames: int, *, seed: int,
               sampling: Sampling, cancel: threading.Event | None = None,
               on_step: Callable[[int, int], None] | None = None, prefix: torch.Tensor | None = None,
               window: int | None = None, stride: int | None = None) -> Iterator[torch.Tensor]:
        """Yield (K, n) blocks of complete, new audio-code frames, in order, until `n_frames` have been produced.

        Any length: the model is run over windows of `window` frames (`window_limits`). The first window starts
        from `prefix` (K, P) when given — the codes an earlier clip ended with, so the music continues it — and
        each later window from the last (window - stride) frames so far, re-prefilled into the KV cache with the
        same text conditioning. One sampling generator runs through all windows: a seed gives one long clip."""
        window, stride = self.window_limits(window, stride)
        context = window - stride
        delays = codebook_delays(self.num_codebooks, self.channels)
        guided = sampling.guided
        batch = 2 if guided else 1
        text, text_mask = self.encode_text(input_ids[:1], attention_mask[:1])
        cross = self._cross_kv(text)
        cross_mask = self._cross_mask(text_mask)
        # one cache for every window (each restarts at position 0): bounded by the window, not the clip
        caches = self._new_caches(batch, window + max(delays) + 1, cross, cross_mask)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if prefix is not None and prefix.shape[-1]:
            history = prefix.to(self.device, torch.long)[:, -min(context, window - 1):]
        else:
            history = torch.zeros(self.num_codebooks, 0, dtype=torch.long, device=self.device)
        produced = 0
        while produced < n_frames:
            prompt = history[:, history.shape[-1] - min(history.shape[-1], context):]
            new = min(n_frames - produced, window - prompt.shape[-1])
            for block in self._window(prompt, new, caches, cross, cross_mask, generator, sampling, cancel, on_step):
                produced += block.shape[-1]
                yield block
                history = torch.cat([history, block], dim=-1)[:, -max(context, 1):]

    def _column(self, codes: torch.Tensor, column: int, delays: list[int]) -> torch.Tensor:
        """Step `column` of the delay pattern for window codes (K, W): codebook k holds frame column - 1 - delay_k,
        padding outside the window."""
        frames = [column - 1 - delay for delay in delays]
        return torch.tensor([codes[k, f] if 0 <= f < codes.shape[-1] else self.pad_id for k, f in enumerate(frames)],
                            dtype=torch.long, device=self.device)

    def _window(self, prompt: torch.Tensor, new: int, caches, cross, cross_mask, generator: torch.Generator,
                sampling: Sampling, cancel: threading.Event | None,
                on_step: Callable[[int, int], None] | None) -> Iterator[torch.Tensor]:
        """One window: re-prefill the cache with the prompt's steps, then sample `new` frames after it."""
        delays = codebook_delays(self.num_codebooks, self.channels)
        max_delay = max(delays)
        p = prompt.shape[-1]
        length = p + new
        total_steps = length + max_delay
        if total_steps + 1 > self.max_positions:
            raise ValueError(f"{length} frames exceed the model's {self.max_positions} positions.")
        batch = 2 if sampling.guided else 1
        codes = torch.full((self.num_codebooks, length), self.pad_id, dtype=torch.long, device=self.device)
        codes[:, :p] = prompt
        # steps 0 .. p-1 hold prompt codes only (the delay pattern rebuilt from complete frames): fill the cache
        for column in range(p):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            self._step(self._column(codes, column, delays).unsqueeze(0).expand(batch, -1).contiguous(), column,
                       caches, cross, cross_mask)
        tokens = self._column(codes, p, delays).unsqueeze(0).expand(batch, -1).contiguous()
        # a prompt frame stays as given even where a step samples it (codebook k > 0 lags the first by k steps)
        fixed = torch.tensor(delays, device=self.device)
        emitted = p
        for position in range(p + 1, total_steps + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            logits = self._step(tokens, position - 1, caches, cross, cross_mask)
            if sampling.guided:
                logits = logits[1] + (logits[0] - logits[1]) * sampling.guidance_scale
            else:
                logits = logits[0]
            sampled = sample(logits, sampling, generator)
            frame = position - 1 - fixed  # the frame each codebook's code belongs to
            own = (frame >= p) & (frame < length)
            inside = (frame >= 0) & (frame < length)
            if bool(own.any()):
                ks = own.nonzero().squeeze(-1)
                codes[ks, frame[ks]] = sampled[ks]
            current = codes[self._codebook_index, frame.clamp(0, length - 1)]
            tokens = torch.where(inside, current, torch.full_like(current, self.pad_id)).unsqueeze(0) \
                .expand(batch, -1).contiguous()
            complete = min(length, position - max_delay)
            if on_step is not None:
                on_step(position, total_steps)
            if complete > emitted:
                yield codes[:, emitted:complete].clone()
                emitted = complete

    @torch.inference_mode()
    def teacher_forced_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              decoder_tokens: torch.Tensor, guidance: bool = True) -> torch.Tensor:
        """Logits (B, T, K, V) for given token sequences (B, K, T); the quality guard against the reference."""
        b = 2 if guidance else 1
        text, text_mask = self.encode_text(input_ids[:1], attention_mask[:1])
        cross = self._cross_kv(text)
        cross_mask = self._cross_mask(text_mask)
        t = decoder_tokens.shape[-1]
        caches = self._new_caches(b, t, cross, cross_mask)
        out = []
        decoder_tokens = decoder_tokens.to(self.device)
        for pos in range(t):
            tokens = decoder_tokens[:1, :, pos].expand(b, -1)
            out.append(self._step(tokens, pos, caches, cross, cross_mask))
        return torch.stack(out, dim=1)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class _Detached(torch.nn.Module):
    """Stands in for the dropped reference decoder, keeping its config for code that reads it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_codebooks = config.num_codebooks


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """logits (K, V) → one token per codebook: temperature, then top-k, then top-p (nucleus), then a draw.

    Works on the k best candidates only (already sorted by `topk`), which gives the same distribution as masking
    the full vocabulary at a fraction of the operations."""
    logits = logits / max(sampling.temperature, 1e-5)
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        values, order = torch.topk(logits, sampling.top_k, dim=-1)
    elif 0.0 < sampling.top_p < 1.0:
        values, order = torch.sort(logits, descending=True, dim=-1)
    else:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    probs = values.softmax(dim=-1)
    if 0.0 < sampling.top_p < 1.0:
        # keep the smallest prefix whose mass reaches p (the token that crosses p included)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > sampling.top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
