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
from .quantize import ACTIVATION_DTYPE, NativeLowBitLinear, pack_linear, resolve_format
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
                 cache_dir: str | None = None, native_kernels: bool = True, fused_layers: bool = True,
                 packs=None):
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

        def decoder_linears(block):  # what `pack` is given for one layer, in the order it is given
            attn, cross = block.self_attn, block.encoder_attn
            return [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.out_proj], [cross.q_proj], [cross.out_proj],
                    [cross.k_proj], [cross.v_proj], [block.fc1], [block.fc2]]

        # `packs` (a `packcache.PackEntry` for this checkpoint, format, code and CPU): the matrices as packed at an
        # earlier start, in the order `pack` is called below; then the fp32 decoder weights are never read
        shapes = [(sum(m.out_features for m in group), group[0].in_features)
                  for block in model.decoder.model.decoder.layers for group in decoder_linears(block)]
        shapes.append((sum(h.out_features for h in model.decoder.lm_heads), model.decoder.lm_heads[0].in_features))
        stored = packs.load(shapes) if packs is not None and packs.format == self.format else None
        made: list = []

        def pack(*linears):
            if stored is not None:
                made.append(NativeLowBitLinear(None, bits=stored[len(made)].bits, kernel=kernel,
                                               packed=stored[len(made)]))
            else:
                made.append(pack_linear(torch.cat([m.weight.detach().float() for m in linears], dim=0), self.format,
                                        device, kernel))
            return made[-1]

        self.embeddings = torch.stack([e.weight.detach() for e in decoder.embed_tokens]).to(device, self.dtype)
        self._codebook_index = torch.arange(self.num_codebooks, device=device)
        self.positions = decoder.embed_positions.weights.detach().to(device, self.dtype)
        self.layers = []
        for block in decoder.layers:
            layer = LayerWeights()
            layer.ln1 = _ln(block.self_attn_layer_norm, self.dtype)
            (layer.qkv, layer.out, layer.cross_q, layer.cross_out, layer.cross_k, layer.cross_v, layer.fc1,
             layer.fc2) = (pack(*group) for group in decoder_linears(block))
            layer.ln2 = _ln(block.encoder_attn_layer_norm, self.dtype)
            layer.ln3 = _ln(block.final_layer_norm, self.dtype)
            self.layers.append(layer)
            if not keep_reference:  # the packed copy is all that is read from now on
                release_file_pages(p for name, p in block.named_parameters() if "layer_norm" not in name)
        self.final_ln = _ln(decoder.layer_norm, self.dtype)
        self.heads_linear = pack(*model.decoder.lm_heads)
        self.packs_reused = stored is not None
        if packs is not None and stored is None and all(getattr(m, "native", False) for m in made):
            packs.save([m.packed for m in made])
        if not keep_reference:
            release_file_pages([*model.decoder.lm_heads.parameters(), *decoder.embed_tokens.parameters()])
        # with the native kernel and shapes it tiles, a whole layer runs as one C call (no per-op Python overhead)
        self._kernel = kernel
        self._fused = None
        self.activation = config.activation_function
        if fused_layers and kernel is not None and self.activation == "gelu" and \
                all(getattr(layer, name).native for layer in self.layers for name in LAYER_MATRICES):
            from .native import MAX_HEAD_DIM, FusedLayer, FusedStack

            if self.head_dim <= MAX_HEAD_DIM and self.head_dim % 4 == 0:
                self._fused = FusedStack(kernel, [
                    FusedLayer(kernel, [getattr(layer, name).packed for name in LAYER_MATRICES],
                               [block.self_attn_layer_norm.weight, block.self_attn_layer_norm.bias,
                                block.encoder_attn_layer_norm.weight, block.encoder_attn_layer_norm.bias,
                                block.final_layer_norm.weight, block.final_layer_norm.bias],
                               block.final_layer_norm.eps, self.heads)
                    for layer, block in zip(self.layers, decoder.layers)])

        # the text side stays in transformers: T5 runs once per request
        self.text_encoder = model.text_encoder
        self.enc_to_dec_proj = getattr(model, "enc_to_dec_proj", None)
        # what one step reads (the text's keys and values are computed once per request, not per step)
        self.weight_bytes = sum(getattr(layer, name).nbytes for layer in self.layers for name in LAYER_MATRICES)
        self.weight_bytes += self.heads_linear.nbytes
        if not keep_reference:
            model.decoder = _Detached(config)  # frees ~1.7 GB of fp32 decoder weights for musicgen-small
            trim()

    # -- text, caches and one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text_encoder(input_ids=input_ids.to(self.device),
                                   attention_mask=attention_mask.to(self.device)).last_hidden_state
        if self.enc_to_dec_proj is not None:
            hidden = self.enc_to_dec_proj(hidden.to(self.enc_to_dec_proj.weight.dtype))
        hidden = hidden * attention_mask.to(self.device)[..., None].to(hidden.dtype)
        return hidden.to(self.dtype), attention_mask.to(self.device).bool()

    @torch.inference_mode()
    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """A prompt as every layer's cross-attention reads it (computed once per request): a `native.TextKV` for
        the fused C layers, else a `TorchText`."""
        text, mask = self.encode_text(input_ids[:1], attention_mask[:1])
        t = text.shape[1]
        flat = text.reshape(-1, self.hidden)
        kv = []
        for layer in self.layers:
            k = layer.cross_k(flat).view(t, self.heads, self.head_dim).transpose(0, 1)
            v = layer.cross_v(flat).view(t, self.heads, self.head_dim).transpose(0, 1)
            kv.append((k, v))
        if self._fused is not None:
            from .native import TextKV

            return TextKV(kv, mask)
        return TorchText([(k[None].to(self.cache_dtype).contiguous(), v[None].to(self.cache_dtype).contiguous())
                          for k, v in kv], mask[:, None, None, :])

    def new_cache(self, length: int):
        """One row's KV cache in every layer, `length` positions: a `native.RowCache` (int8) for the C path, else a
        `TorchCache` (cache_dtype)."""
        if self._fused is not None:
            from .native import RowCache

            return RowCache(len(self.layers), self.heads, length, self.head_dim)
        return TorchCache(len(self.layers), self.heads, length, self.head_dim, self.cache_dtype, self.device)

    def use_kernel(self, kernel) -> None:
        """Run the fused layers with another build of the native kernel (tests compare the portable AVX2 and
        scalar builds with the one compiled for this CPU); the packed weights are the same bytes for every build (an
        AVX2 build reads the fifth bits as slices it makes once)."""
        if self._fused is None:
            raise ValueError("this decoder does not run fused native layers")
        self._fused = self._fused.with_kernel(kernel)

    @property
    def fused(self) -> bool:
        """Whether a step runs every layer in one native call (else per-operation PyTorch)."""
        return self._fused is not None

    def step(self, tokens: torch.Tensor, positions: list[int], caches: list, texts: list) -> torch.Tensor:
        """One step for rows that each bring their tokens (K codes), position, cache and text (None: the
        unconditional row of classifier-free guidance, which attends to a masked, all-zero text and so gets exactly
        zero from cross-attention, as in transformers and audiocraft): tokens (R, K) → logits (R, K, V).

        Every operation is row by row or row-independent (the C kernel quantizes activations per row; attention
        reads the row's own cache), so a row's logits do not depend on which rows share its step: that is what lets
        requests decode together and still give exactly what they give alone."""
        b = tokens.shape[0]
        h, d = self.heads, self.head_dim
        x = self.embeddings[self._codebook_index, tokens].sum(dim=1)
        x = x * self.embed_scale + self.positions[torch.tensor(positions, device=self.device)]
        if self._fused is not None:
            x = x.contiguous()
            self._fused(x, caches, positions, texts)  # every layer in one C call
            x = F.layer_norm(x, *self.final_ln)
            return self.heads_linear(x).view(b, self.num_codebooks, self.vocab_size).float()
        conditional = [r for r, text in enumerate(texts) if text is not None]
        for index, layer in enumerate(self.layers):
            y = F.layer_norm(x, *layer.ln1)
            q, k, v = layer.qkv(y).view(b, 3, h, d).unbind(1)
            for r, (cache, pos) in enumerate(zip(caches, positions)):  # all writes first: rows may share a cache
                k_cache, v_cache = cache.layers[index]
                k_cache[:, pos] = k[r]
                v_cache[:, pos] = v[r]
            rows = []
            for cache, pos, r in zip(caches, positions, range(b)):
                k_cache, v_cache = cache.layers[index]
                rows.append(F.scaled_dot_product_attention(q[r].view(1, h, 1, d).to(self.cache_dtype),
                                                           k_cache[None, :, : pos + 1], v_cache[None, :, : pos + 1]))
            x = x + layer.out(torch.cat(rows).to(self.dtype).reshape(b, h * d))
            if conditional:
                y = F.layer_norm(x[conditional], *layer.ln2)
                q = layer.cross_q(y).view(len(conditional), h, 1, d).to(self.cache_dtype)
                a = torch.cat([F.scaled_dot_product_attention(q[j:j + 1], *texts[r].layers[index],
                                                              attn_mask=texts[r].mask)
                               for j, r in enumerate(conditional)]).to(self.dtype)
                x = x.clone()
                x[conditional] = x[conditional] + layer.cross_out(a.reshape(len(conditional), h * d))
            y = F.layer_norm(x, *layer.ln3)
            x = x + layer.fc2(F.gelu(layer.fc1(y)) if self.activation == "gelu" else
                              _activation(self.activation)(layer.fc1(y)))
        x = F.layer_norm(x, *self.final_ln)
        return self.heads_linear(x).view(b, self.num_codebooks, self.vocab_size).float()

    # -- requests ----------------------------------------------------------------------------------------------
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

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_frames: int, *, seed: int,
               sampling: Sampling, prefix: torch.Tensor | None = None, window: int | None = None,
               stride: int | None = None) -> "Decode":
        """One request's decode, to be stepped alone (`frames`) or together with others (`engine.Engine`)."""
        return Decode(self, input_ids, attention_mask, n_frames, seed=seed, sampling=sampling, prefix=prefix,
                      window=window, stride=stride)

    @torch.inference_mode()
    def frames(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_frames: int, *, seed: int,
               sampling: Sampling, cancel: threading.Event | None = None,
               on_step: Callable[[int, int], None] | None = None, prefix: torch.Tensor | None = None,
               window: int | None = None, stride: int | None = None) -> Iterator[torch.Tensor]:
        """Yield (K, n) blocks of complete, new audio-code frames, in order, until `n_frames` have been produced.

        Any length: the model runs over windows of `window` frames (`window_limits`). The first window starts from
        `prefix` (K, P) when given — the codes an earlier clip ended with, so that the music continues it — and
        each later window from the last (window - stride) frames so far, prefilled into its own KV cache with the
        same text. One sampling generator runs through all windows: a seed gives one long clip."""
        state = self.decode(input_ids, attention_mask, n_frames, seed=seed, sampling=sampling, prefix=prefix,
                            window=window, stride=stride)
        steps = 0
        while not state.done:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            tokens, positions, caches, texts = state.rows()
            blocks = state.advance(self.step(tokens, positions, caches, texts))
            steps += 1
            if on_step is not None:
                on_step(steps, state.total_steps)
            yield from blocks

    @torch.inference_mode()
    def teacher_forced_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              decoder_tokens: torch.Tensor, guidance: bool = True) -> torch.Tensor:
        """Logits (B, T, K, V) for given token sequences (B, K, T); the quality guard against the reference."""
        text = self.text(input_ids, attention_mask)
        t = decoder_tokens.shape[-1]
        texts = [text, None] if guidance else [text]
        caches = [self.new_cache(t) for _ in texts]
        out = []
        decoder_tokens = decoder_tokens.to(self.device)
        for pos in range(t):
            tokens = decoder_tokens[:1, :, pos].expand(len(texts), -1)
            out.append(self.step(tokens, [pos] * len(texts), caches, texts))
        return torch.stack(out, dim=1)


class TorchCache:
    """One row's KV cache in every layer for the PyTorch path: keys and values (H, T, Dh)."""

    def __init__(self, layers: int, heads: int, length: int, head_dim: int, dtype, device):
        self.length = length
        self.layers = [(torch.zeros(heads, length, head_dim, dtype=dtype, device=device),
                        torch.zeros(heads, length, head_dim, dtype=dtype, device=device)) for _ in range(layers)]


class TorchText:
    """A prompt's cross-attention keys and values per layer, (1, H, T, Dh), and SDPA's boolean mask."""

    def __init__(self, layers: list, mask: torch.Tensor):
        self.layers = layers
        self.mask = mask


# prompt columns one step may prefill: the rows cost compute, not bandwidth, so a few dozen make a continuation's
# first window start several times sooner than one column a step
PREFILL_COLUMNS = 32


class _Window:
    """One window of a request: its codes (prompt frames first), the caches of its rows and how far it has got.

    Column c of the delay pattern — what the model is fed at position c — holds, for codebook k, frame
    c - 1 - delay_k of the window (padding outside it). Columns below `prompt` hold prompt frames only; they are
    prefilled into the caches without sampling."""

    def __init__(self, lm: "FastMusicLM", length: int, prompt: int, caches: list):
        self.codes = torch.full((lm.num_codebooks, length), lm.pad_id, dtype=torch.long, device=lm.device)
        self.prompt = prompt
        self.length = length
        self.caches = caches  # rows write only positions they then read: a used cache needs no clearing
        self.column = 0  # the next column to feed
        self.emitted = prompt  # frames handed out (prompt frames are not new)


class Decode:
    """One request's decode as a state machine driven step by step from outside: `rows()` are this step's rows,
    `advance(logits)` takes their logits and returns the frames that became complete.

    A long request runs window after window. The next window's prompt — the current window's last
    (window - stride) frames — is prefilled while the current window is still sampling: its rows ride along in
    the same steps, one column per step as soon as that column's frames are complete, so that when the window
    is full the next one starts at once instead of stalling for a re-prefill. Rows are independent (see
    `FastMusicLM.step`), so this gives the same codes as prefilling at the boundary."""

    def __init__(self, lm: "FastMusicLM", input_ids, attention_mask, n_frames: int, *, seed: int,
                 sampling: Sampling, prefix: torch.Tensor | None = None, window: int | None = None,
                 stride: int | None = None):
        self.lm = lm
        self.sampling = sampling
        self.n_frames = int(n_frames)
        self.window, self.stride = lm.window_limits(window, stride)
        self.context = self.window - self.stride
        self.delays = codebook_delays(lm.num_codebooks, lm.channels)
        self.max_delay = max(self.delays)
        self._delay_index = torch.tensor(self.delays, device=lm.device)
        self.text = lm.text(input_ids, attention_mask)
        self.texts = [self.text, None] if sampling.guided else [self.text]
        self.generator = torch.Generator(device=lm.device).manual_seed(int(seed))
        self.cache_length = self.window + self.max_delay + 1
        if prefix is not None and prefix.shape[-1] and self.context:
            prompt = prefix.to(lm.device, torch.long)[:, -min(self.context, self.window - 1):]
        else:
            prompt = torch.zeros(lm.num_codebooks, 0, dtype=torch.long, device=lm.device)
        self.produced = 0
        self._spare = None
        self.current = self._open(prompt.shape[-1])
        self.current.codes[:, : prompt.shape[-1]] = prompt
        self.shadow: _Window | None = None
        # steps still to run, for progress: prefill columns plus sampling steps of every window
        windows_after = max(0, -(-(self.n_frames - (self.current.length - self.current.prompt)) // self.stride))
        self.total_steps = self.current.length + self.max_delay + windows_after * (self.window + self.max_delay)
        self._pending: list = []  # what the rows of this step were: ("current" | "shadow", row count)

    def _open(self, prompt: int) -> _Window:
        new = min(self.n_frames - self.produced, self.window - prompt)
        return _Window(self.lm, prompt + new, prompt, self._caches())

    def _caches(self) -> list:
        """Caches for a window's rows: the ones the window before last used (two windows' worth in all), or new."""
        if self._spare is not None:
            caches, self._spare = self._spare, None
            return caches
        return [self.lm.new_cache(self.cache_length) for _ in self.texts]

    @property
    def done(self) -> bool:
        return self.produced >= self.n_frames

    def _column(self, codes: torch.Tensor, column: int, offset: int = 0) -> torch.Tensor:
        """Column `column` of the delay pattern of window codes `codes[:, offset:]` (padding outside them)."""
        frames = column - 1 - self._delay_index
        inside = (frames >= 0) & (frames < codes.shape[-1] - offset)
        picked = codes[self.lm._codebook_index, (frames + offset).clamp(0, codes.shape[-1] - 1)]
        return torch.where(inside, picked, torch.full_like(picked, self.lm.pad_id))

    def _next_window_prompt(self) -> int:
        """The prompt length of the window after the current one (0: there is none)."""
        cur = self.current
        if self.produced + (cur.length - cur.emitted) >= self.n_frames or not self.context:
            return 0
        return min(self.context, cur.length)

    def _shadow_column(self) -> int | None:
        """The next window's column that can be prefilled at this step, if any: column c needs the current
        window's frames up to (length - prompt) + c - 1 complete."""
        prompt = self._next_window_prompt()
        if not prompt:
            return None
        if self.shadow is None:
            self.shadow = _Window(self.lm, 0, prompt, self._caches())
        column = self.shadow.column
        complete = self.current.column - self.max_delay  # frames of the current window fully sampled
        if column >= prompt or complete < self.current.length - prompt + column:
            return None
        return column

    def rows(self, prefill_columns: int = PREFILL_COLUMNS) -> tuple[torch.Tensor, list[int], list, list]:
        """This step's rows: (tokens (R, K), positions, caches, texts). A window whose prompt is not yet in its
        cache (the first window of a continuation) feeds up to `prefill_columns` prompt columns at once."""
        cur = self.current
        count = max(1, min(prefill_columns, cur.prompt - cur.column)) if cur.column < cur.prompt else 1
        tokens = [self._column(cur.codes, cur.column + i) for i in range(count)]
        positions = [cur.column + i for i in range(count)]
        caches = [cache for _ in range(count) for cache in cur.caches]
        texts = [text for _ in range(count) for text in self.texts]
        self._pending = [("current", count)]
        shadow_column = self._shadow_column()
        if shadow_column is not None:
            tokens.append(self._column(cur.codes, shadow_column, offset=cur.length - self.shadow.prompt))
            positions.append(shadow_column)
            caches += self.shadow.caches
            texts += self.texts
            self._pending.append(("shadow", len(self.texts)))
        rows = len(self.texts)
        tokens = torch.stack(tokens).repeat_interleave(rows, dim=0)
        return tokens, [p for p in positions for _ in range(rows)], caches, texts

    def advance(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Take this step's logits (R, K, V); return the new complete frames, as (K, n) blocks."""
        cur = self.current
        blocks = []
        if any(kind == "shadow" for kind, _ in self._pending):
            self.shadow.column += 1
        if cur.column < cur.prompt:  # prefilling the current window: nothing to sample
            cur.column += self._pending[0][1]
            return blocks
        rows = logits[: len(self.texts)]
        guided = self.sampling.guided
        step_logits = rows[1] + (rows[0] - rows[1]) * self.sampling.guidance_scale if guided else rows[0]
        sampled = sample(step_logits, self.sampling, self.generator)
        position = cur.column + 1  # the column these codes fill
        frame = position - 1 - self._delay_index
        own = (frame >= cur.prompt) & (frame < cur.length)  # prompt frames stay as given, outside is padding
        if bool(own.any()):
            ks = own.nonzero().squeeze(-1)
            cur.codes[ks, frame[ks]] = sampled[ks]
        cur.column = position
        complete = min(cur.length, position - self.max_delay)
        if complete > cur.emitted:
            blocks.append(cur.codes[:, cur.emitted:complete].clone())
            self.produced += complete - cur.emitted
            cur.emitted = complete
        if complete >= cur.length and not self.done:
            self._next_window()
        return blocks

    def _next_window(self) -> None:
        old = self.current
        prompt = self._next_window_prompt_after(old)
        shadow = self.shadow
        new = min(self.n_frames - self.produced, self.window - prompt)
        if shadow is None or shadow.prompt != prompt:
            shadow = _Window(self.lm, 0, prompt, self._caches())
        shadow.codes = torch.full((self.lm.num_codebooks, prompt + new), self.lm.pad_id, dtype=torch.long,
                                  device=self.lm.device)
        shadow.codes[:, :prompt] = old.codes[:, old.length - prompt:]
        shadow.length = prompt + new
        self.current, self.shadow, self._spare = shadow, None, old.caches

    def _next_window_prompt_after(self, old: _Window) -> int:
        return min(self.context, old.length) if self.context else 0


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
