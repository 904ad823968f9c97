"""Host-to-device copies of a chunk's batches, double-buffered on CUDA.

On one stream a batch's copy waits for the previous batch's model, and the model for the copy.
Here the copies run on a side stream into two device buffers that alternate: while the model
works on batch i (from one buffer), batch i + 1 is copied into the other. Events order the two
streams: the model waits until its batch has arrived, and a buffer is refilled only after the
model's work on its previous batch has been enqueued, which the stream order then guarantees
to have finished reading it. Host tensors must be pinned for the copies to be asynchronous
(``device.pin``). On the CPU the batches are the host tensors' slices, as before.
``$ASTROMER_FAST_H2D_DOUBLE_BUFFER=0`` turns the side stream off (copies on the model's stream).
"""

from __future__ import annotations

import os

import torch

DOUBLE_BUFFER_ENV = "ASTROMER_FAST_H2D_DOUBLE_BUFFER"


def double_buffering(device: torch.device) -> bool:
    """Whether batches for ``device`` are copied on a side stream."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and os.environ.get(DOUBLE_BUFFER_ENV, "1").strip() != "0")


def iter_batches(host: dict, names, batches, device, rows: int):
    """Yields, per (row slice, width) of ``batches``, a dict name -> tensor on ``device`` holding
    ``host[name][row slice, :width]``. ``rows``: the most rows of any batch (buffer size).

    A yielded batch's tensors stay valid until the next one is asked for: the consumer must have
    enqueued all its work on them by then (on the current stream)."""
    device = torch.device(device)
    if not double_buffering(device):
        cuda = device.type == "cuda"
        for sl, width in batches:
            # Whole rows are one contiguous block of pinned memory (a truly asynchronous copy);
            # the width is cut on the device. A column slice would be staged through pageable
            # memory, which makes the copy synchronous.
            yield {n: (host[n][sl].to(device, non_blocking=True)[:, :width] if cuda
                       else host[n][sl, :width]) for n in names}
        return
    yield from _double_buffered(host, names, batches, device, rows)


def _double_buffered(host, names, batches, device, rows):
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    bufs = [{n: torch.empty((rows, host[n].shape[1]), dtype=host[n].dtype, device=device)
             for n in names} for _ in range(2)]
    ready = [torch.cuda.Event(), torch.cuda.Event()]
    consumed: list = [None, None]
    batches = list(batches)

    def issue(i):
        slot = i % 2
        sl, _ = batches[i]
        with torch.cuda.stream(side):
            if consumed[slot] is not None:
                side.wait_event(consumed[slot])
            for n in names:
                src = host[n][sl]
                bufs[slot][n][:src.shape[0]].copy_(src, non_blocking=True)
            ready[slot].record(side)

    try:
        if batches:
            issue(0)
        for i, (sl, width) in enumerate(batches):
            if i + 1 < len(batches):
                issue(i + 1)
            slot = i % 2
            compute.wait_event(ready[slot])
            n_rows = sl.stop - sl.start
            yield {n: bufs[slot][n][:n_rows, :width] for n in names}
            # Everything the consumer does with batch i is enqueued on ``compute`` by now.
            ev = torch.cuda.Event()
            ev.record(compute)
            consumed[slot] = ev
    finally:
        # The buffers belong to the model's stream (allocated there), which may reuse their memory
        # once they are freed: it must first wait for a copy still in flight (an early close).
        compute.wait_stream(side)


__all__ = ["DOUBLE_BUFFER_ENV", "double_buffering", "iter_batches"]
