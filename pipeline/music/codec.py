"""Incremental EnCodec decoding: audio for new code frames without re-decoding the whole clip.

MusicGen's EnCodec decoder is a non-causal convolution (kernel 7, ±3 frames), a 2-layer LSTM, then an
upsampling stack of convolutions with a finite receptive field. Each stage is run incrementally:

1. the first convolution on a window with 3 frames of context each side (frames near a true end of the clip use
   the module's own reflect padding, exactly as a one-shot decode does);
2. the LSTM with its hidden state carried from chunk to chunk (exact: an LSTM is sequential anyway);
3. the upsampling stack on a window with `CONTEXT_FRAMES` of context each side, keeping the middle.

So the streamed samples equal a one-shot `EncodecModel.decode` of the same codes up to float rounding (the
tests check 1e-5), while each chunk costs only its own frames plus a little context.
"""

from __future__ import annotations

import torch

CONV_CONTEXT = 3  # (kernel 7 - 1) / 2
CONTEXT_FRAMES = 2  # the upsampling stack reaches ~1.3 frames each way (1 already matches to 1e-7 in tests)
LOOKAHEAD_FRAMES = CONV_CONTEXT + CONTEXT_FRAMES  # frames past a sample's own that must exist before it is final


class StreamingCodec:
    """One channel of EnCodec's decoder (codes → samples), fed a few frames at a time."""

    def __init__(self, audio_encoder):
        self.model = audio_encoder
        layers = audio_encoder.decoder.layers
        self.first_conv = layers[0]
        self.lstm = layers[1].lstm
        self.upsample = torch.nn.Sequential(*layers[2:])
        self.hop = int(torch.prod(torch.tensor(audio_encoder.config.upsampling_ratios)))
        self.channels = audio_encoder.config.audio_channels
        self.reset()

    def reset(self) -> None:
        # buffers hold frames [offset, offset + width) in absolute frame numbers
        self._embeddings, self._embeddings_offset = None, 0
        self._lstm_out, self._lstm_offset = None, 0
        self._lstm_state = None
        self._n_frames = 0
        self._conv_done = 0  # frames through the convolution and the LSTM
        self._audio_done = 0  # frames turned into samples

    @staticmethod
    def _append(buffer, block):
        return block if buffer is None else torch.cat([buffer, block], dim=-1)

    @torch.inference_mode()
    def push(self, codes: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Add (K, n) code frames; return the newly final audio samples (1, channels, m)."""
        if codes.shape[-1]:
            self._embeddings = self._append(self._embeddings, self.model.quantizer.decode(codes.unsqueeze(1)))
            self._n_frames += codes.shape[-1]
        n = self._n_frames
        ready = n if final else n - CONV_CONTEXT
        if ready > self._conv_done:
            # 1. first convolution, with 3 frames of real context on each side where the clip has them
            start = max(0, self._conv_done - CONV_CONTEXT)
            end = n if final else min(n, ready + CONV_CONTEXT)
            window = self._embeddings[..., start - self._embeddings_offset: end - self._embeddings_offset]
            new = self.first_conv(window)[..., self._conv_done - start: ready - start]
            # 2. the LSTM with carried state; EnCodec's LSTM block adds its input back
            seq = new.permute(2, 0, 1)
            y, self._lstm_state = self.lstm(seq, self._lstm_state)
            self._lstm_out = self._append(self._lstm_out, (y + seq).permute(1, 2, 0))
            self._conv_done = ready
        # 3. the upsampling stack on a window with CONTEXT_FRAMES of context each side
        target = self._conv_done if final else self._conv_done - CONTEXT_FRAMES
        if target <= self._audio_done:
            return torch.zeros(1, self.channels, 0)
        start = max(0, self._audio_done - CONTEXT_FRAMES)
        end = self._conv_done if final else min(self._conv_done, target + CONTEXT_FRAMES)
        audio = self.upsample(self._lstm_out[..., start - self._lstm_offset: end - self._lstm_offset])
        audio = audio[..., (self._audio_done - start) * self.hop: (target - start) * self.hop]
        self._audio_done = target
        self._drop_consumed()
        return audio

    @property
    def unfinished_samples(self) -> int:
        """Samples of frames already pushed that are not yet final (they wait for the frames after them)."""
        return (self._n_frames - self._audio_done) * self.hop

    def snapshot(self) -> "StreamingCodec":
        """An independent copy in the same state: a clip's end is decoded with `final=True`, and a snapshot taken
        just before lets a later request continue the same audio as if the clip had gone on."""
        copy = StreamingCodec.__new__(StreamingCodec)
        copy.__dict__.update(self.__dict__)
        copy._embeddings = None if self._embeddings is None else self._embeddings.clone()
        copy._lstm_out = None if self._lstm_out is None else self._lstm_out.clone()
        copy._lstm_state = None if self._lstm_state is None else tuple(t.clone() for t in self._lstm_state)
        return copy

    def _drop_consumed(self) -> None:
        # keep only what a later window can still read, so long clips use bounded memory
        keep_embeddings = max(0, self._conv_done - CONV_CONTEXT)
        if keep_embeddings > self._embeddings_offset:
            self._embeddings = self._embeddings[..., keep_embeddings - self._embeddings_offset:]
            self._embeddings_offset = keep_embeddings
        keep_lstm = max(0, self._audio_done - CONTEXT_FRAMES)
        if keep_lstm > self._lstm_offset:
            self._lstm_out = self._lstm_out[..., keep_lstm - self._lstm_offset:]
            self._lstm_offset = keep_lstm
