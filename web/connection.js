// The WebSocket to the gateway: request/answer correlation, timeouts, and reconnect with
// exponential backoff.
//
// The browser protocol has no request ids (the original page's wire format is kept), so an
// answer is matched to its request by what it names: `model_list` answers `list_models`,
// `metadata` answers `get_metadata` for the same model, a video frame answers the
// `get_video_frame` with the same frame id, `stream_started` answers the `stream_start` with
// the same stream id. Requests with the same key are answered first in, first out.
// Everything that answers no pending request (tagged stream frames, stream errors, stream
// ends) is dispatched as an event instead.

import { binaryKind, parseTaggedFrame, parseVideoFrame, ProtocolError } from "./protocol.js";

export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  WAITING: "waiting", // closed, a reconnect is scheduled
  STOPPED: "stopped",
});

export class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
  }
}

export class ConnectionLost extends Error {
  constructor(message = "connection lost") {
    super(message);
    this.name = "ConnectionLost";
  }
}

/** The same-origin gateway address: ws:// for http pages, wss:// for https pages. */
export function defaultUrl(location = window.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

/** url with ?token= added (browsers cannot set headers on a WebSocket handshake). */
export function withToken(url, token) {
  if (!token) return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

/**
 * The correlation keys an answer from the gateway may settle, most likely first; empty when
 * it answers no request. A `stream_error` may answer any request about its stream (start,
 * interrupt or stop) or none (the stream failed on its own).
 */
function answerKeys(msg) {
  switch (msg.type) {
    case "model_list":
      return ["list_models"];
    case "metadata":
      return [`metadata:${msg.model_name}`];
    case "video_frame":
      return [`frame:${msg.frame_id}`];
    case "stream_started":
      return [`stream_start:${msg.stream}`];
    case "stream_error":
      return [`stream_start:${msg.stream}`, `stream_interrupt:${msg.stream}`, `stream_stop:${msg.stream}`];
    case "stream_interrupted":
      return [`stream_interrupt:${msg.stream}`];
    case "stream_ended":
      return [`stream_stop:${msg.stream}`];
    case "hello":
      return ["hello"];
    case "stats":
      return ["get_stats"];
    default:
      return [];
  }
}

/**
 * Events (CustomEvent, payload in `detail`):
 *  - "state": {state, url, retryInMs, attempt, everOpened, code}
 *  - "message": a JSON message that answered no pending request
 *  - "tagged": a parsed tagged stream frame
 *  - "protocol-error": {error} for a message that could not be read
 */
export class Connection extends EventTarget {
  constructor({ url, token = "", initialBackoffMs = 1000, maxBackoffMs = 30000 } = {}) {
    super();
    this.url = url;
    this.token = token;
    this.initialBackoffMs = initialBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.state = State.STOPPED;
    this.ws = null;
    this.attempt = 0;
    this.everOpened = false;
    this.pending = new Map(); // key -> [{resolve, reject, timer}]
    this.retryTimer = null;
    this.tickTimer = null;
    this.retryAt = 0;
    this.lastCode = 0;
  }

  /** Start connecting (again) to `url` with `token`. */
  start(url = this.url, token = this.token) {
    this.url = url;
    this.token = token;
    this.everOpened = false;
    this.attempt = 0;
    this.#teardown(new ConnectionLost("reconnecting to a new address"));
    this.#open();
  }

  /** Close and stay closed. */
  stop() {
    this.#teardown(new ConnectionLost("disconnected"));
    this.#setState(State.STOPPED);
  }

  /** Skip the rest of the backoff wait. */
  retryNow() {
    if (this.state === State.WAITING) {
      this.#clearTimers();
      this.#open();
    }
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Bytes queued in the socket, not yet handed to the network. */
  get bufferedAmount() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  /** Send a JSON object or binary data; false when the socket is not open. */
  send(data) {
    if (!this.isOpen) return false;
    this.ws.send(typeof data === "string" || data instanceof ArrayBuffer ? data : JSON.stringify(data));
    return true;
  }

  /**
   * Send `message` and wait for its answer (matched by `key`, see answerKeys). Rejects with
   * TimeoutError after `timeoutMs` and with ConnectionLost when the socket closes first.
   */
  request(message, key, timeoutMs = 5000) {
    return new Promise((resolve, reject) => {
      if (!this.isOpen) {
        reject(new ConnectionLost("not connected"));
        return;
      }
      const waiter = { resolve, reject, timer: 0 };
      waiter.timer = setTimeout(() => {
        this.#removeWaiter(key, waiter);
        reject(new TimeoutError(`no answer to ${message.type} in ${timeoutMs / 1000} s`));
      }, timeoutMs);
      const queue = this.pending.get(key);
      if (queue) queue.push(waiter);
      else this.pending.set(key, [waiter]);
      this.send(message);
    });
  }

  #removeWaiter(key, waiter) {
    const queue = this.pending.get(key);
    if (!queue) return;
    const i = queue.indexOf(waiter);
    if (i >= 0) queue.splice(i, 1);
    if (queue.length === 0) this.pending.delete(key);
  }

  /** Hand `answer` to the oldest waiter for `key`; false when nobody waits. */
  #settle(key, answer) {
    const queue = this.pending.get(key);
    if (!queue || queue.length === 0) return false;
    const waiter = queue.shift();
    if (queue.length === 0) this.pending.delete(key);
    clearTimeout(waiter.timer);
    waiter.resolve(answer);
    return true;
  }

  #open() {
    this.#setState(State.CONNECTING);
    let ws;
    try {
      ws = new WebSocket(withToken(this.url, this.token));
    } catch (err) {
      // A malformed URL throws synchronously: there is nothing to retry.
      this.lastCode = 0;
      this.#setState(State.STOPPED, { error: `bad gateway address: ${err.message}` });
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.everOpened = true;
      this.#setState(State.OPEN);
    };
    ws.onmessage = (event) => this.#onMessage(event.data);
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.lastCode = event.code;
      this.#failPending(new ConnectionLost("gateway gone"));
      this.#scheduleRetry();
    };
    // onerror is always followed by onclose, which does the work; the browser already
    // reports the failed handshake itself.
    ws.onerror = () => {};
  }

  #scheduleRetry() {
    const delay = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this.attempt);
    this.attempt += 1;
    this.retryAt = performance.now() + delay;
    this.retryTimer = setTimeout(() => {
      this.#clearTimers();
      this.#open();
    }, delay);
    // Tell the page once a second how long is left, so it can count down.
    this.tickTimer = setInterval(() => this.#setState(State.WAITING), 1000);
    this.#setState(State.WAITING);
  }

  #onMessage(data) {
    if (typeof data === "string") {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        this.#emit("protocol-error", { error: "gateway sent text that is not JSON" });
        return;
      }
      if (msg === null || typeof msg !== "object") {
        this.#emit("protocol-error", { error: "gateway sent JSON that is not an object" });
        return;
      }
      if (!answerKeys(msg).some((key) => this.#settle(key, msg))) this.#emit("message", msg);
      return;
    }
    try {
      const kind = binaryKind(data);
      if (kind === "tagged_frame") {
        this.#emit("tagged", parseTaggedFrame(data));
      } else if (kind === "video_frame") {
        const frame = parseVideoFrame(data);
        this.#settle(`frame:${frame.frameId}`, frame);
      } else {
        this.#emit("binary", { kind, data });
      }
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.#emit("protocol-error", { error: err.message });
    }
  }

  #failPending(error) {
    const pending = this.pending;
    this.pending = new Map();
    for (const queue of pending.values()) {
      for (const waiter of queue) {
        clearTimeout(waiter.timer);
        waiter.reject(error);
      }
    }
  }

  #clearTimers() {
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    this.retryTimer = null;
    this.tickTimer = null;
  }

  #teardown(error) {
    this.#clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(1000, "client closing");
    }
    this.#failPending(error);
  }

  #setState(state, extra = {}) {
    this.state = state;
    this.#emit("state", {
      state,
      url: this.url,
      attempt: this.attempt,
      everOpened: this.everOpened,
      code: this.lastCode,
      retryInMs: state === State.WAITING ? Math.max(0, this.retryAt - performance.now()) : 0,
      ...extra,
    });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
