// Loading an avatar's full frames: many requests in flight, each failed frame retried on its
// own, and a store that keeps decoded frames within a memory budget.
//
// A big avatar does not fit decoded: 523 frames of 1280x720 are ~1.9 GB of pixels. The store
// therefore keeps every frame's JPEG (small) and a bounded cache of decoded ImageBitmaps; a
// frame that fell out of the cache is decoded again when a stream frame names it, which is
// well ahead of the time it is drawn.

import { ConnectionLost } from "./connection.js";

const DECODED_BUDGET_BYTES = 512 * 1024 * 1024;

/** Decode JPEG bytes into an ImageBitmap. */
export function decodeJpeg(bytes) {
  return createImageBitmap(new Blob([bytes], { type: "image/jpeg" }));
}

export class FrameStore {
  constructor(modelName, count) {
    this.modelName = modelName;
    this.count = count;
    this.jpegs = new Array(count).fill(null);
    this.width = 0;
    this.height = 0;
    this.capacity = count; // decoded frames kept; set once the frame size is known
    this.decoded = new Map(); // frameId -> Promise<ImageBitmap>, in use order (LRU)
    this.ready = new Map(); // frameId -> ImageBitmap, the decoded subset of `decoded`
  }

  get loaded() {
    return this.jpegs.reduce((n, j) => n + (j ? 1 : 0), 0);
  }

  has(frameId) {
    return frameId >= 0 && frameId < this.count && this.jpegs[frameId] !== null;
  }

  /** Store a frame's JPEG and its decoded bitmap (the first one also fixes the size). */
  put(frameId, jpeg, bitmap) {
    this.jpegs[frameId] = jpeg.slice(); // own copy: `jpeg` is a view into a socket message
    if (!this.width) {
      this.width = bitmap.width;
      this.height = bitmap.height;
      const frameBytes = bitmap.width * bitmap.height * 4;
      this.capacity = Math.max(64, Math.min(this.count, Math.floor(DECODED_BUDGET_BYTES / frameBytes)));
    }
    this.#remember(frameId, Promise.resolve(bitmap));
  }

  /** The decoded frame (from the cache, or decoded now); null when it never loaded. */
  get(frameId) {
    const cached = this.decoded.get(frameId);
    if (cached) {
      this.decoded.delete(frameId); // move to the young end
      this.decoded.set(frameId, cached);
      return cached;
    }
    if (!this.has(frameId)) return Promise.resolve(null);
    const promise = decodeJpeg(this.jpegs[frameId]).catch(() => null);
    this.#remember(frameId, promise);
    return promise;
  }

  /** A decoded frame right now, if it is in the cache and done decoding. */
  peek(frameId) {
    return this.ready.get(frameId) ?? null;
  }

  #remember(frameId, promise) {
    this.decoded.set(frameId, promise);
    promise.then((bitmap) => {
      if (bitmap && this.decoded.get(frameId) === promise) this.ready.set(frameId, bitmap);
    });
    while (this.decoded.size > this.capacity) {
      const [oldId, oldPromise] = this.decoded.entries().next().value;
      this.decoded.delete(oldId);
      const bitmap = this.ready.get(oldId);
      this.ready.delete(oldId);
      // Free the pixels now rather than at the next garbage collection.
      if (bitmap) oldPromise.then(() => bitmap.close());
    }
  }

  /** Free every decoded frame. */
  close() {
    for (const bitmap of this.ready.values()) bitmap.close();
    this.decoded.clear();
    this.ready.clear();
  }
}

/**
 * Fetch frames 0..count-1 of `modelName` ("full_body" video) into a FrameStore.
 *
 * `concurrency` requests are in flight at once; a frame that fails or times out is asked for
 * again up to `retries` times before it is given up (the others still load). Resolves with
 * {store, failed: [frameIds]}; rejects only when the connection is lost or `signal` aborts.
 */
export async function loadFrames(
  connection,
  modelName,
  count,
  { concurrency = 16, retries = 3, timeoutMs = 10000, onProgress = () => {}, signal } = {},
) {
  const store = new FrameStore(modelName, count);
  const failed = [];
  let next = 0;
  let done = 0;

  const fetchOne = async (frameId) => {
    let lastError = null;
    for (let attempt = 0; attempt <= retries; attempt++) {
      if (signal?.aborted) throw signal.reason;
      try {
        const answer = await connection.request(
          { type: "get_video_frame", model_name: modelName, frame_id: frameId, video_type: "full_body" },
          `frame:${frameId}`,
          timeoutMs,
        );
        if (answer.error !== undefined) throw new Error(answer.error || "frame failed");
        const bitmap = await decodeJpeg(answer.jpeg);
        if (signal?.aborted) {
          bitmap.close();
          throw signal.reason;
        }
        store.put(frameId, answer.jpeg, bitmap);
        return;
      } catch (err) {
        if (err instanceof ConnectionLost || signal?.aborted) throw signal?.reason ?? err;
        lastError = err;
        // A short pause before the retry, growing per attempt, so a struggling gateway is
        // not hammered.
        await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
      }
    }
    failed.push({ frameId, error: lastError?.message ?? "failed" });
  };

  const lane = async () => {
    while (next < count) {
      const frameId = next++;
      await fetchOne(frameId);
      done += 1;
      onProgress(done, count, store);
    }
  };

  const lanes = Array.from({ length: Math.min(concurrency, count) }, lane);
  const results = await Promise.allSettled(lanes);
  const rejected = results.find((r) => r.status === "rejected");
  if (rejected) {
    store.close();
    throw rejected.reason;
  }
  return { store, failed };
}
