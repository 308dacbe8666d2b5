"""The SDS's diffusion pass (ControlNet, then the UNet; no autograd) replayed as one CUDA graph.

Why: on an H100 a `full` step kept the GPU busy only about half the time (profile of
2026-11-26): the ControlNet and the UNet issue over a thousand kernels per call, and at batch 2
(classifier-free guidance) on 64x64 latents many finish sooner than Python launches the next.
Every SDS call of a run has the same shapes, so the pass is captured once and then replayed with
a single launch. The inputs are copied into the graph's own tensors; the output tensor is the
graph's and is overwritten by the next replay (callers turn it into a new tensor at once).

A CUDA-only path (``SDSConfig.cuda_graphs``; a run turns it on with ``OptimiseConfig.cuda_graphs``:
1.8x faster SDS steps on an H100, the same gradient to the bit; docs/BENCHMARKS.md). The graph
keeps its own memory pool for the pass's activations: an H100 run reserved 13.6 GiB against 12.9
GiB eager (to step 1828). A capture that fails (an operation that waits on the device inside
diffusers) raises; ``DepthControlledSDS`` then runs the pass eagerly and says why once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Pass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class GraphedPass:
    """``fn(x, t, text, control, conditioning_scale)`` captured per input signature and replayed.

    A new signature (shapes, dtypes, memory layout, conditioning scale) captures again; a run
    has one, or two when the conditioning scale follows a schedule with plateaus.
    """

    def __init__(self, fn: Pass, warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self.captures = 0

    @staticmethod
    def signature(tensors: list[torch.Tensor], scale: float) -> tuple:
        layout = [(tuple(t.shape), t.dtype, t.device, t.is_contiguous(memory_format=torch.channels_last)) for t in tensors]
        return (tuple(layout), float(scale))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, control: torch.Tensor,
                 conditioning_scale: float) -> torch.Tensor:
        tensors = [x, t, text, control]
        if any(v.device.type != "cuda" for v in tensors):
            raise RuntimeError("CUDA graphs need every input on a CUDA device")
        key = self.signature(tensors, conditioning_scale)
        if key != self.key:
            self._capture(tensors, conditioning_scale, key)
        for own, new in zip(self.inputs, tensors):
            own.copy_(new)
        self.graph.replay()  # type: ignore[union-attr]
        return self.output  # type: ignore[return-value]

    def _capture(self, tensors: list[torch.Tensor], scale: float, key: tuple) -> None:
        self.graph, self.output, self.key = None, None, None  # a failed capture leaves nothing half-made
        inputs = [v.clone() for v in tensors]  # clone keeps the memory layout (channels_last stays)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream: cuDNN/cuBLAS pick their kernels
            for _ in range(self.warmup):
                self.fn(*inputs, scale)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs, scale)
        self.graph, self.inputs, self.output, self.key = graph, inputs, output, key
        self.captures += 1
