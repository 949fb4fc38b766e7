"""A stand-in for the model: the small surface the runner and `produce` use of a pipeline
(`sdmodel.produce.Denoiser`), answering at once with flat images, so that the runner's parts
are tested on a real index and a real store without a network to run."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Callable

from PIL import Image

from sdq.core.params import Request


class FakePipeline:
    """Images of one colour per seed; `calls` lists each batch's seeds in the order asked.
    `fail(requests)` may raise, as a device or a bug would, before anything is made."""

    def __init__(self, sha256: str = "f" * 64, *, batch_size: int = 8,
                 fail: Callable[[Sequence[Request]], None] | None = None) -> None:
        self.sha256, self.name, self.device, self.dtype = sha256, "fake", "cpu", "fp32"
        self.vae_dtype = self.dtype
        self.batch_size, self.fail = batch_size, fail
        self.calls: list[tuple[int, ...]] = []
        self.lora_sets: list[Any] = []
        """The `loras` each call asked for, as `Pipeline.generate` takes them."""
        self.called = threading.Condition()

    def default_batch_size(self, width: int = 512, height: int = 512) -> int:
        return self.batch_size

    def generate(self, requests: Sequence[Request], **settings: Any) -> list[Image.Image]:
        with self.called:
            self.calls.append(tuple(r.seed for r in requests))
            self.lora_sets.append(tuple(settings.get("loras", ())))
            self.called.notify_all()
        if self.fail is not None:
            self.fail(requests)
        if settings.get("on_step") is not None:  # one step is all it takes
            settings["on_step"](settings["steps"], settings["steps"])
        size = (settings["width"], settings["height"])
        return [Image.new("RGB", size, (r.seed % 256, r.seed // 256 % 256, 7)) for r in requests]

    def wait_for_call(self, seeds: tuple[int, ...], timeout: float = 60) -> None:
        """Until a batch of exactly `seeds` has been asked for."""
        with self.called:
            assert self.called.wait_for(lambda: seeds in self.calls, timeout), self.calls
