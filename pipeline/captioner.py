"""Image captions with BLIP (`Salesforce/blip-image-captioning-base` by default) through transformers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from PIL import Image

MAX_NEW_TOKENS = 30


class Captioner:
    """Loaded once and shared; `caption` takes a batch of RGB images (see `pipeline.images.load_image`)."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype=None, int8: bool = False):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor
        from transformers.models.blip import BlipImageProcessorPil

        self.device = device
        processor = BlipProcessor.from_pretrained(path, image_processor=BlipImageProcessorPil.from_pretrained(path))
        model = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32).eval()
        if int8 and device == "cpu":
            # dynamic int8 (fbgemm, VNNI) on every Linear: ~4x smaller and faster on CPU, captions unchanged in
            # practice; the vision transformer and the text decoder are both Linear-bound
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self._model = model.to(device)
        self._processor = processor
        self._dtype = next(p.dtype for p in self._model.parameters() if p.is_floating_point()) \
            if any(p.is_floating_point() for p in self._model.parameters()) else torch.float32
        self._lock = threading.Lock()
        self.quantized = bool(int8 and device == "cpu")

    def caption(self, images: Sequence[Image.Image], prefix: str | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
        import torch

        if not images:
            return []
        prefix = (prefix or "").strip() or None
        inputs = self._processor(images=list(images), text=[prefix] * len(images) if prefix else None,
                                 return_tensors="pt")
        inputs = {k: (v.to(self.device, self._dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with self._lock, torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                                       repetition_penalty=1.3)
        texts = self._processor.batch_decode(out, skip_special_tokens=True)
        return [_tidy(t) for t in texts]


def _tidy(text: str) -> str:
    text = " ".join(text.split()).strip()
    return text[:1].upper() + text[1:] if text else text
