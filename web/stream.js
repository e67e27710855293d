// One server-driven stream (docs/streams.md): open it, send audio, receive tagged frames and
// hand them to the player with their due time, interrupt, stop.
//
// Time base: an "epoch" starts with the first audio sample sent after the stream opened (or
// after an interrupt, which restarts the stream's clock). `t0` is the AudioContext time of
// that sample, so the frame that shows audio time t is due at t0 + t + delay, where delay
// is the stream's lookahead plus a margin for inference and transport. A file is played
// back at t0 + delay, so picture and sound meet; for the microphone the delay only smooths
// the pacing and grows when frames arrive later than it allows.

import { encodeAudioChunk } from "./protocol.js";
import { RATE } from "./capture.js";

const START_TIMEOUT_MS = 10000;
const MARGIN_S = 0.25; // on top of the lookahead: batching, inference, transport
const MAX_DELAY_S = 5;
const JITTER_MARGIN_S = 0.06; // microphone: kept above the latest recent arrival
const ARRIVALS_KEPT = 50; // two seconds of frames at 25 fps
const SHRINK_PER_FRAME_S = 0.008; // at 25 fps: 0.2 s per second, never a visible jump
const LATENCY_SMOOTHING = 0.1;

export class StreamError extends Error {
  constructor(message, code = "") {
    super(message);
    this.name = "StreamError";
    this.code = code;
  }
}

/** A client-chosen stream id, so the answer to stream_start can be matched to it. */
function newStreamId() {
  const [id] = crypto.getRandomValues(new Uint32Array(1));
  return (id & 0x7fffffff) || 1;
}

/**
 * Events: "error" {message, code} (the stream failed after it started), "ended" {frames,
 * idle_frames, dropped} (the gateway ended it).
 */
export class StreamSession extends EventTarget {
  #lastDue = 0; // the latest due time handed to the player

  constructor(connection, player, audioCtx, { modelName, mode = "crop" }) {
    super();
    this.connection = connection;
    this.player = player;
    this.audioCtx = audioCtx;
    this.modelName = modelName;
    this.mode = mode;
    this.id = newStreamId();
    this.playerToken = -1;
    this.info = null;
    this.closed = false;
    this.discarding = false; // between stream_interrupt and its answer
    this.onTagged = (e) => this.#tagged(e.detail);
    this.onMessage = (e) => this.#message(e.detail);
    this.#resetEpoch();
    this.stats = { received: 0, idle: 0, serverDropped: 0, latencyMs: null, workerId: "", processingMs: 0 };
  }

  get lookaheadMs() {
    return this.info?.lookahead_ms ?? null;
  }

  /** Frames dropped so far: gaps in the sequence plus frames that arrived too late to show. */
  get dropped() {
    return this.stats.serverDropped + this.player.skipped;
  }

  /** Ask the gateway for the stream; resolves with its `stream_started` answer. */
  async open() {
    this.connection.addEventListener("tagged", this.onTagged);
    this.connection.addEventListener("message", this.onMessage);
    let answer;
    try {
      answer = await this.connection.request(
        { type: "stream_start", model_name: this.modelName, sample_rate: RATE, mode: this.mode, stream: this.id },
        `stream_start:${this.id}`,
        START_TIMEOUT_MS,
      );
    } catch (err) {
      this.close();
      throw err;
    }
    if (answer.type !== "stream_started") {
      this.close();
      throw new StreamError(answer.error || "stream refused", answer.code);
    }
    this.info = answer;
    this.playerToken = this.player.begin(() => this.audioCtx.currentTime);
    return answer;
  }

  /** Start an epoch at AudioContext time `t0`; `fixed` keeps the delay (a file is playing). */
  beginEpoch(t0, { fixed = false } = {}) {
    this.t0 = t0;
    this.delay = this.defaultDelay;
    this.fixedDelay = fixed;
  }

  /** The audio-to-picture delay a new epoch starts with, in seconds. */
  get defaultDelay() {
    return (this.lookaheadMs ?? 500) / 1000 + MARGIN_S;
  }

  /** Send one chunk of 16 kHz int16 audio. `endTime` (AudioContext s) dates the microphone. */
  sendAudio(samples, endTime = null) {
    if (this.closed) return false;
    if (this.t0 === null) {
      const end = endTime ?? this.audioCtx.currentTime;
      this.beginEpoch(end - samples.length / RATE);
    }
    if (!this.connection.send(encodeAudioChunk(this.id, samples))) return false;
    this.sentSamples += samples.length;
    return true;
  }

  /** Barge-in: drop everything queued for this stream; the next audio starts a new epoch. */
  async interrupt() {
    if (this.closed) return;
    this.discarding = true;
    this.player.clear();
    this.#resetEpoch();
    let answer;
    try {
      answer = await this.connection.request({ type: "stream_interrupt", stream: this.id }, `stream_interrupt:${this.id}`, 5000);
    } finally {
      this.discarding = false;
      this.lastSeq = null;
    }
    if (answer.type === "stream_error") this.#failed(answer);
  }

  /**
   * End the stream: frames for the audio already sent still come, then `stream_ended`.
   * Resolves with that answer.
   */
  async stop() {
    if (this.closed) return null;
    const wait = Math.max(5000, (this.lookaheadMs ?? 500) + 5000);
    try {
      const ended = await this.connection.request({ type: "stream_stop", stream: this.id }, `stream_stop:${this.id}`, wait);
      if (ended.type === "stream_error") this.#failed(ended);
      this.#ended(ended);
      return ended;
    } finally {
      this.close();
    }
  }

  /** Stop listening; the canvas keeps the last frame. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.connection.removeEventListener("tagged", this.onTagged);
    this.connection.removeEventListener("message", this.onMessage);
    // Let the frames already queued play out before the player stops.
    const left = this.t0 === null ? 0 : Math.max(0, this.#lastDue - this.audioCtx.currentTime);
    setTimeout(() => this.player.end(this.playerToken), left * 1000 + 100);
  }

  #resetEpoch() {
    this.t0 = null;
    this.delay = this.defaultDelay;
    this.fixedDelay = false;
    this.arrivals = [];
    this.sentSamples = 0;
    this.lastSeq = null;
    this.#lastDue = 0;
  }

  #tagged(frame) {
    if (frame.stream !== this.id || this.discarding || this.t0 === null) return;
    const s = this.stats;
    s.received += 1;
    if (frame.idle) s.idle += 1;
    else s.processingMs = frame.processingUs / 1000;
    if (frame.workerId) s.workerId = frame.workerId;
    if (this.lastSeq !== null && frame.seq > this.lastSeq + 1) s.serverDropped += frame.seq - this.lastSeq - 1;
    this.lastSeq = frame.seq;

    // Audio in -> frame out: how much audio had been sent beyond the one this frame shows.
    const latency = (this.sentSamples * 1000) / RATE - frame.audioMs;
    s.latencyMs = s.latencyMs === null ? latency : s.latencyMs + LATENCY_SMOOTHING * (latency - s.latencyMs);

    const now = this.audioCtx.currentTime;
    if (!this.fixedDelay) this.#adaptDelay(now - (this.t0 + frame.audioMs / 1000));
    const due = this.t0 + frame.audioMs / 1000 + this.delay;
    this.#lastDue = Math.max(this.#lastDue, due);
    this.player.schedule(frame, due);
  }

  /**
   * Microphone only (nothing is played back, so the delay is free): a jitter buffer just
   * deep enough for the recent arrivals. It grows at once when a frame comes later than the
   * delay allows (so pacing stays even instead of stuttering), up to MAX_DELAY_S, and
   * shrinks slowly back towards the lookahead when frames come early again, so a burst of
   * slow inference does not leave the avatar lagging for good.
   */
  #adaptDelay(arrivalS) {
    this.arrivals.push(arrivalS);
    if (this.arrivals.length > ARRIVALS_KEPT) this.arrivals.shift();
    const floor = (this.lookaheadMs ?? 500) / 1000;
    const target = Math.min(MAX_DELAY_S, Math.max(floor, ...this.arrivals) + JITTER_MARGIN_S);
    if (target > this.delay) this.delay = target;
    else this.delay = Math.max(target, this.delay - SHRINK_PER_FRAME_S);
  }

  #message(msg) {
    if (msg.stream !== this.id) return;
    if (msg.type === "stream_error") {
      this.dispatchEvent(new CustomEvent("error", { detail: { message: msg.error || "stream failed", code: msg.code } }));
    } else if (msg.type === "stream_ended") {
      this.#ended(msg);
      this.dispatchEvent(new CustomEvent("ended", { detail: msg }));
      this.close();
    }
  }

  /** The gateway answered with `stream_error`: the stream is gone. */
  #failed(msg) {
    this.close();
    throw new StreamError(msg.error || "stream failed", msg.code);
  }

  #ended(msg) {
    if (typeof msg?.dropped === "number") {
      this.stats.serverDropped = Math.max(this.stats.serverDropped, msg.dropped);
    }
  }
}
