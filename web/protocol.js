// Binary layouts of the browser protocol (docs/protocol.md, docs/streams.md), pure functions.
//
// Nothing here touches a socket or the DOM, so every layout can be read and tested on its own.
// All integers are little-endian. The first byte of a gateway -> browser binary message says
// what it is: 0/1 = inference result (layout C), 2 = video frame (layout D), 3 = tagged stream
// frame. Browser -> gateway messages of our own start with 0x00 (never a valid layout A or B).

export const VIDEO_FRAME = 2;
export const TAGGED_FRAME = 3;

export const EXTENSION = 0x00;
export const AUDIO = 0x01;

/** Tagged-frame flag bits. */
export const FLAG_IDLE = 1; // no speech: no inference was run
export const FLAG_COMPOSITE = 2; // the image is the whole frame
export const FLAG_NO_IMAGE = 4; // draw the preloaded full frame `frameId`

const utf8 = new TextDecoder("utf-8", { fatal: false });

export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** What a binary message from the gateway holds: "inference", "video_frame", "tagged_frame"
 * or "unknown". */
export function binaryKind(buffer) {
  if (buffer.byteLength === 0) return "unknown";
  const first = new Uint8Array(buffer, 0, 1)[0];
  if (first === 0 || first === 1) return "inference";
  if (first === VIDEO_FRAME) return "video_frame";
  if (first === TAGGED_FRAME) return "tagged_frame";
  return "unknown";
}

/** A bounds-checked little-endian reader over an ArrayBuffer. */
class Reader {
  constructor(buffer, what) {
    this.view = new DataView(buffer);
    this.buffer = buffer;
    this.offset = 0;
    this.what = what;
  }

  need(n) {
    if (this.offset + n > this.view.byteLength) {
      throw new ProtocolError(
        `truncated ${this.what}: need ${this.offset + n} bytes, have ${this.view.byteLength}`,
      );
    }
  }

  u8() {
    this.need(1);
    return this.view.getUint8(this.offset++);
  }

  u32() {
    this.need(4);
    const v = this.view.getUint32(this.offset, true);
    this.offset += 4;
    return v;
  }

  f32() {
    this.need(4);
    const v = this.view.getFloat32(this.offset, true);
    this.offset += 4;
    return v;
  }

  /** A view (no copy) of the next n bytes. */
  bytes(n) {
    this.need(n);
    const out = new Uint8Array(this.buffer, this.offset, n);
    this.offset += n;
    return out;
  }

  text(n) {
    return utf8.decode(this.bytes(n));
  }
}

/** Layout D: u8 2 | u32 frame_id | u8 type_len | video_type | u32 data_len | JPEG. */
export function parseVideoFrame(buffer) {
  const r = new Reader(buffer, "video frame");
  if (r.u8() !== VIDEO_FRAME) throw new ProtocolError("not a video frame");
  const frameId = r.u32();
  const videoType = r.text(r.u8());
  const jpeg = r.bytes(r.u32());
  return { frameId, videoType, jpeg };
}

/** Layout C: u8 success | u32 frame_id | u32 processing_ms | u32 len | JPEG or error text
 * | (on success) u32 bounds_len_bytes | f32 x bounds. */
export function parseInferenceResult(buffer) {
  const r = new Reader(buffer, "inference result");
  const success = r.u8() === 1;
  const frameId = r.u32();
  const processingMs = r.u32();
  const len = r.u32();
  if (!success) {
    return { success, frameId, processingMs, error: r.text(len) };
  }
  const image = r.bytes(len);
  let bounds = [];
  if (r.offset < buffer.byteLength) {
    const n = r.u32() / 4;
    bounds = Array.from({ length: n }, () => r.f32());
  }
  return { success, frameId, processingMs, image, bounds };
}

/** Tagged stream frame (docs/streams.md, "Gateway -> client"). */
export function parseTaggedFrame(buffer) {
  const r = new Reader(buffer, "tagged frame");
  if (r.u8() !== TAGGED_FRAME) throw new ProtocolError("not a tagged frame");
  const stream = r.u32();
  const seq = r.u32();
  const frameId = r.u32();
  const audioMs = r.u32();
  const flags = r.u8();
  const bounds = [r.f32(), r.f32(), r.f32(), r.f32()];
  const processingUs = r.u32();
  const workerId = r.text(r.u8());
  const image = r.bytes(r.u32());
  return {
    stream,
    seq,
    frameId,
    audioMs,
    flags,
    idle: (flags & FLAG_IDLE) !== 0,
    composite: (flags & FLAG_COMPOSITE) !== 0,
    noImage: (flags & FLAG_NO_IMAGE) !== 0,
    bounds,
    processingUs,
    workerId,
    image,
  };
}

/** Browser -> gateway audio chunk: 0x00 0x01 | u32 stream | int16 LE mono PCM. */
export function encodeAudioChunk(stream, samples) {
  if (!(samples instanceof Int16Array)) throw new TypeError("samples must be an Int16Array");
  const out = new ArrayBuffer(6 + samples.byteLength);
  const view = new DataView(out);
  view.setUint8(0, EXTENSION);
  view.setUint8(1, AUDIO);
  view.setUint32(2, stream >>> 0, true);
  // Int16Array is platform-endian; every browser we target is little-endian, but write
  // through the DataView anyway so the wire format never depends on it.
  for (let i = 0; i < samples.length; i++) view.setInt16(6 + 2 * i, samples[i], true);
  return out;
}

/** Float samples in [-1, 1] -> int16 with rounding and clipping. */
export function floatToInt16(input) {
  const out = new Int16Array(input.length);
  for (let i = 0; i < input.length; i++) {
    const s = Math.max(-1, Math.min(1, input[i]));
    out[i] = Math.round(s < 0 ? s * 32768 : s * 32767);
  }
  return out;
}
