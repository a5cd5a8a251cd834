"""Image captions with BLIP (`Salesforce/blip-image-captioning-base` by default) through transformers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .memory import release_file_pages, trim
from .runtime import build_model, fast_bf16

MAX_NEW_TOKENS = 30


class Captioner:
    """Loaded once and shared; `caption` takes a batch of RGB images (see `pipeline.images.load_image`)."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype=None, int8: bool = False):
        from transformers import BlipForConditionalGeneration, BlipProcessor
        from transformers.models.blip import BlipImageProcessorPil

        self.device = device
        processor = BlipProcessor.from_pretrained(path, image_processor=BlipImageProcessorPil.from_pretrained(path))
        model = build_model(BlipForConditionalGeneration.from_pretrained, path, dtype=dtype or torch.float32).eval()
        originals = [p.detach() for p in model.parameters()]  # the fp32 storages: .to() swaps Parameter data
        if int8 and device == "cpu":
            vision = model.vision_model
            bf16_vision = fast_bf16()
            if bf16_vision:
                del model.vision_model
            # dynamic int8 (fbgemm, VNNI) on the text decoder's Linear layers: a caption token reads every weight,
            # so 4x fewer bytes is ~2x faster; captions are unchanged in practice
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            # the vision transformer multiplies 577 patch tokens at once: compute-bound, where bf16 matrix units
            # (AMX / AVX-512 BF16) beat int8 by 2.5x; without them it is quantized like the rest
            model.vision_model = _BFloat16Vision(vision) if bf16_vision else \
                torch.ao.quantization.quantize_dynamic(vision, {torch.nn.Linear}, dtype=torch.qint8)
        if int8 and device == "cpu":
            for module in model.modules():
                if type(module) is _DynamicLinear:
                    module.__class__ = _PerImageLinear
        self._model = model.to(device)
        if int8 and device == "cpu":
            # the fp32 weights were read once for conversion: hand their mapped pages back
            release_file_pages(originals)
        del originals
        trim()
        self._processor = processor
        self._dtype = next(p.dtype for p in self._model.parameters() if p.is_floating_point()) \
            if any(p.is_floating_point() for p in self._model.parameters()) else torch.float32
        self._lock = threading.Lock()
        self.quantized = bool(int8 and device == "cpu")

    def caption(self, images: Sequence[Image.Image], prefix: str | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS, min_new_tokens: int | None = None) -> list[str]:
        """One caption per image, each the one the image gets on its own: several images share one batched
        `generate` (an album's photos, a clip's scenes) only where the batch cannot change a result — int8 text
        decoder with per-image activation scales, bf16 or int8 vision; in fp32 the matrix products block
        differently by batch size, so there the images go one at a time."""
        if not images:
            return []
        if len(images) > 1 and not self.quantized:
            return [self.caption([image], prefix, max_new_tokens, min_new_tokens)[0] for image in images]
        prefix = (prefix or "").strip() or None
        inputs = self._processor(images=list(images), text=[prefix] * len(images) if prefix else None,
                                 return_tensors="pt")
        inputs = {k: (v.to(self.device, self._dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with self._lock, torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       num_beams=1, do_sample=False, repetition_penalty=1.3)
        texts = self._processor.batch_decode(out, skip_special_tokens=True)
        return [_tidy(t) for t in texts]


_DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


class _PerImageLinear(_DynamicLinear):
    """Dynamic int8 Linear whose activations are quantized per batch row (one image's tokens): the stock one
    takes one scale for the whole batch, so an image's caption would depend on the other images it is batched
    with. The weights are still read once per row; the rest of the decoder runs batched."""

    def forward(self, x):
        if x.dim() < 3 or x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(_PerImageLinear, self).forward(x[i:i + 1]) for i in range(x.shape[0])])


class _BFloat16Vision(torch.nn.Module):
    """BLIP's vision transformer run in bf16, answering in fp32 for the (int8) text decoder."""

    def __init__(self, vision: torch.nn.Module):
        super().__init__()
        self.inner = vision.to(torch.bfloat16)
        self.config = vision.config

    def forward(self, pixel_values, **kwargs):
        output = self.inner(pixel_values=pixel_values.to(torch.bfloat16), **kwargs)
        for key, value in output.items():
            if torch.is_tensor(value) and value.is_floating_point():
                output[key] = value.float()
        return output


def _tidy(text: str) -> str:
    text = " ".join(text.split()).strip()
    return text[:1].upper() + text[1:] if text else text
