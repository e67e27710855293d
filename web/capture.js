// Audio sources for a stream: the microphone (through the capture worklet) and a file the
// user picked (decoded, resampled to 16 kHz, sent at real-time pace, and played back so
// that what you hear lines up with the frames).

import { floatToInt16 } from "./protocol.js";

export const RATE = 16000;
export const CHUNK_SAMPLES = 320; // 20 ms at 16 kHz

const workletLoaded = new WeakMap(); // AudioContext -> Promise

/** A readable message for a getUserMedia failure. */
export function microphoneError(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "microphone blocked: allow it for this page in the browser's site settings";
    case "NotFoundError":
    case "OverconstrainedError":
      return "no microphone found";
    case "NotReadableError":
      return "the microphone is in use by another program";
    default:
      return `microphone failed: ${err?.message ?? err}`;
  }
}

/**
 * The microphone, resampled to 16 kHz in the worklet. `onChunk({samples, rms, endTime})` gets
 * an Int16Array of CHUNK_SAMPLES per ~20 ms; `endTime` is the AudioContext time of its end.
 */
export class MicSource {
  constructor(ctx, onChunk) {
    this.ctx = ctx;
    this.onChunk = onChunk;
    this.media = null;
    this.source = null;
    this.node = null;
  }

  async start() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("the microphone needs a secure page (https or localhost)");
    }
    if (!workletLoaded.has(this.ctx)) {
      workletLoaded.set(this.ctx, this.ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url)));
    }
    await workletLoaded.get(this.ctx);
    try {
      this.media = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
    } catch (err) {
      throw new Error(microphoneError(err));
    }
    this.source = this.ctx.createMediaStreamSource(this.media);
    this.node = new AudioWorkletNode(this.ctx, "capture-16k", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
      processorOptions: { targetRate: RATE, chunkSamples: CHUNK_SAMPLES },
    });
    this.node.port.onmessage = (event) => this.onChunk(event.data);
    this.source.connect(this.node);
  }

  stop() {
    this.node?.port.postMessage("stop");
    if (this.node) this.node.port.onmessage = null;
    this.source?.disconnect();
    for (const track of this.media?.getTracks() ?? []) track.stop();
    this.node = this.source = this.media = null;
  }
}

/** Decode an audio file (any format the browser knows) into an AudioBuffer. */
export async function decodeAudioFile(file, ctx) {
  const bytes = await file.arrayBuffer();
  try {
    return await ctx.decodeAudioData(bytes);
  } catch {
    throw new Error(`cannot decode ${file.name}: not an audio file this browser can read`);
  }
}

/** Mono 16 kHz int16 of an AudioBuffer, resampled by the browser (OfflineAudioContext). */
export async function to16kInt16(buffer) {
  const length = Math.max(1, Math.ceil(buffer.duration * RATE));
  const offline = new OfflineAudioContext(1, length, RATE);
  const src = offline.createBufferSource();
  src.buffer = buffer;
  src.connect(offline.destination); // a 1-channel destination mixes the channels down
  src.start();
  const rendered = await offline.startRendering();
  return floatToInt16(rendered.getChannelData(0));
}

/**
 * A decoded file, sent at real-time pace from `t0` (AudioContext seconds) and played back
 * from `t0 + delay`, so the sound of audio time t plays when the frame for t is drawn.
 * `onChunk({samples})` per 20 ms, `onSent()` once all audio went out, `onEnded()` once
 * playback finished.
 */
export class FileSource {
  constructor(ctx, buffer, pcm16k, { onChunk, onSent = () => {}, onEnded = () => {} }) {
    this.ctx = ctx;
    this.buffer = buffer;
    this.pcm = pcm16k;
    this.onChunk = onChunk;
    this.onSent = onSent;
    this.onEnded = onEnded;
    this.sent = 0;
    this.timer = 0;
    this.player = null;
  }

  get durationS() {
    return this.pcm.length / RATE;
  }

  start(t0, delay) {
    this.t0 = t0;
    this.player = this.ctx.createBufferSource();
    this.player.buffer = this.buffer;
    this.player.connect(this.ctx.destination);
    this.player.onended = () => this.onEnded();
    this.player.start(t0 + delay);
    // Send what the clock says is due, every 20 ms: a throttled timer (background tab)
    // catches up in one go instead of drifting.
    this.timer = setInterval(() => this.#pump(), 20);
    this.#pump();
  }

  #pump() {
    const due = Math.min(this.pcm.length, Math.floor((this.ctx.currentTime - this.t0) * RATE));
    while (this.sent < this.pcm.length && (due - this.sent >= CHUNK_SAMPLES || due === this.pcm.length)) {
      const end = Math.min(this.sent + CHUNK_SAMPLES, this.pcm.length);
      this.onChunk({ samples: this.pcm.slice(this.sent, end) });
      this.sent = end;
    }
    if (this.sent >= this.pcm.length && this.timer) {
      clearInterval(this.timer);
      this.timer = 0;
      this.onSent();
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = 0;
    if (this.player) {
      this.player.onended = null;
      try {
        this.player.stop();
      } catch {
        // never started: nothing to stop
      }
      this.player.disconnect();
      this.player = null;
    }
  }
}
