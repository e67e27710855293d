// Drawing stream frames on the canvas at the right time by the audio clock.
//
// Every tagged frame carries the audio time it shows. The session turns that into a due
// time on the AudioContext clock (the same clock that plays a chosen file, so picture and
// sound line up); the player decodes the frame as soon as it arrives and draws, on each
// animation frame, the newest frame that is due. A frame that became due while a newer one
// was already due is skipped and counted as dropped: a late lip-sync frame is worth nothing.

import { decodeJpeg } from "./loader.js";

const FPS_WINDOW_MS = 2000;

export class Player {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.store = null;
    this.clock = () => 0;
    this.queue = []; // {frame, due, ready, full, image}, in sequence order
    this.drawTimes = [];
    this.skipped = 0;
    this.drawn = 0;
    this.lastDrawn = null;
    this.raf = 0;
    this.generation = 0;
    this.owner = 0; // which begin() the drawing loop belongs to
  }

  /** A new avatar: size the canvas to its frames and show its first frame. */
  async setFrames(store) {
    this.clear();
    this.store = store;
    this.canvas.width = store.width;
    this.canvas.height = store.height;
    const first = await store.get(0);
    if (first && this.store === store && this.queue.length === 0) this.#drawFull(first);
  }

  /**
   * Start drawing by `clock` (seconds, monotonic: the AudioContext's currentTime). Returns a
   * token for end(), so that a stream that ends late cannot stop the next one's drawing.
   */
  begin(clock) {
    this.clear();
    this.clock = clock;
    this.skipped = 0;
    this.drawn = 0;
    this.drawTimes = [];
    if (!this.raf) this.raf = requestAnimationFrame(() => this.#tick());
    this.owner += 1;
    return this.owner;
  }

  /** Stop drawing (if `token` is still the current owner); the last frame stays shown. */
  end(token = this.owner) {
    if (token !== this.owner) return;
    this.clear();
    cancelAnimationFrame(this.raf);
    this.raf = 0;
    this.#rest();
  }

  /** Back to the plain avatar frame last shown: no stale mouth left once talking ends. */
  async #rest() {
    const last = this.lastDrawn;
    const store = this.store;
    if (!last || !store) return;
    const full = await store.get(last.frameId);
    if (this.raf === 0 && this.store === store && this.lastDrawn === last) this.#drawFull(full);
  }

  /** Forget every queued frame (barge-in, or the end of a stream). */
  clear() {
    this.generation += 1;
    for (const item of this.queue) item.image?.close();
    this.queue = [];
  }

  /** Frames per second drawn over the last two seconds. */
  get fps() {
    const now = performance.now();
    while (this.drawTimes.length && now - this.drawTimes[0] > FPS_WINDOW_MS) this.drawTimes.shift();
    return (this.drawTimes.length * 1000) / FPS_WINDOW_MS;
  }

  /** Queue a tagged frame to be drawn at `due` (clock seconds). */
  schedule(frame, due) {
    const item = { frame, due, ready: false, full: null, image: null };
    this.queue.push(item);
    const generation = this.generation;
    const needsFull = !frame.composite && this.store !== null;
    Promise.all([
      needsFull ? this.store.get(frame.frameId) : Promise.resolve(null),
      frame.image.byteLength > 0 ? decodeJpeg(frame.image) : Promise.resolve(null),
    ]).then(
      ([full, image]) => {
        if (generation !== this.generation) {
          image?.close();
          return;
        }
        item.full = full;
        item.image = image;
        item.ready = true;
      },
      () => {
        // A frame that does not decode is dropped like a late one.
        item.ready = true;
        item.failed = true;
      },
    );
  }

  #tick() {
    this.raf = requestAnimationFrame(() => this.#tick());
    const now = this.clock();
    let chosen = -1;
    for (let i = 0; i < this.queue.length && this.queue[i].due <= now; i++) {
      if (this.queue[i].ready && !this.queue[i].failed) chosen = i;
    }
    if (chosen < 0) {
      // Drop frames that could not be decoded once they are due.
      while (this.queue.length && this.queue[0].failed && this.queue[0].due <= now) {
        this.queue.shift();
        this.skipped += 1;
      }
      return;
    }
    const dropped = this.queue.splice(0, chosen + 1);
    const item = dropped.pop();
    for (const old of dropped) {
      old.image?.close();
      this.skipped += 1;
    }
    this.#draw(item);
    item.image?.close();
  }

  #draw({ frame, full, image }) {
    const { ctx, canvas } = this;
    if (frame.composite && image) {
      ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    } else {
      // Crop mode: the preloaded full frame, then the mouth crop at its bounds. An idle frame
      // has no image: the full frame alone is the avatar with its mouth closed.
      this.#drawFull(full);
      if (image) {
        const [x1, y1, x2, y2] = frame.bounds;
        ctx.drawImage(image, x1, y1, x2 - x1, y2 - y1);
      }
    }
    this.drawn += 1;
    this.drawTimes.push(performance.now());
    this.lastDrawn = {
      seq: frame.seq,
      frameId: frame.frameId,
      audioMs: frame.audioMs,
      idle: frame.idle,
      noImage: frame.noImage,
      composite: frame.composite,
      bounds: frame.bounds,
      workerId: frame.workerId,
    };
  }

  #drawFull(bitmap) {
    const { ctx, canvas } = this;
    // width 0 = a bitmap already closed by the frame cache: never draw a detached image.
    if (bitmap && bitmap.width) {
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    } else {
      ctx.fillStyle = "#222";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
    }
  }
}
