"""Server-driven streams (docs/streams.md): the client sends audio, the gateway decides which
frames to compute, asks the workers as soon as each frame's audio is in, and paces the
frames out at the avatar's frame rate.

The pieces, each in its own module:

- :class:`StreamHub` (``hub``, one per gateway): what streams share: settings
  (``shared.config.StreamConfig``), metrics (``metrics``: counters and the audio-in →
  frame-out latency), the LRU of raw full frames that composite-mode idle frames show
  (``idle``), and a random token that makes stream keys unique across gateways.
- :class:`StreamSet` (``streamset``, one per connection): routes ``stream_*`` JSON and
  ``0x00 0x01`` audio chunks to its streams, answers malformed ones, and cancels all of them
  when the connection closes.
- :class:`Stream` (``stream``, one per stream): the asyncio part of a stream: its pacer task,
  its requests in flight (through an injected ``request``, ``BrokerClient.request``'s
  signature) and its messages (through an injected async ``send``).
- Sans-I/O, no asyncio and no clock of their own (``now`` is passed in), with their own unit
  tests: ``core.StreamCore`` (which frames to issue, their clips, the stream's epochs, stop
  and failures), ``clock.PlayoutClock`` (slots, frame deadlines, catch-up, the window of
  inferences in flight, and ``decide``: send, drop, wait, delay, restart) and
  ``audio.AudioBuffer`` (feed, slice, silence, trim).

A stream's life, in its own time base (``t = 0`` at its first audio sample, or at the first
after an interrupt):

1. Frame ``j`` shows audio time ``j / fps``. Once the stream holds audio up to the end of
   frame ``j``'s clip (``shared.streamtime``: about 0.49 s after ``j / fps``), the frame is
   *issued*: if the 200 ms around its time is silent it is an idle frame (no inference),
   otherwise an ``infer`` request carries the clip. At most ``max_ahead`` frames are issued
   and not yet sent per stream.
2. The pacer sends frames in order, one every ``1/fps``. Its clock starts when the first
   frame is ready; a frame still computing ``grace`` after its slot is dropped (its request
   cancelled: a late lip-sync frame is worth nothing). A frame that was not even issued by
   then (the client's audio came late) is not dropped: the clock restarts when it is ready,
   so a stalled microphone does not turn into a burst of drops.
3. ``stream_stop`` pads the audio with silence so that every frame whose time falls inside
   the received audio can be computed, lets them play out, then answers ``stream_ended``.
   ``stream_interrupt`` cancels everything at once and restarts the clock with the next
   audio; sequence numbers and the frame-id walk carry on, so the head does not jump.

Nothing here imports torch or touches a socket.
"""

from __future__ import annotations

from gateway.streams.hub import StreamHub
from gateway.streams.idle import IdleFrames
from gateway.streams.interfaces import RequestFn, SendFn
from gateway.streams.metrics import StreamMetrics
from gateway.streams.stream import Stream
from gateway.streams.streamset import StreamSet


__all__ = [
    "IdleFrames",
    "RequestFn",
    "SendFn",
    "Stream",
    "StreamHub",
    "StreamMetrics",
    "StreamSet",
]
