// AudioWorklet processor: microphone (at the context's rate, 44.1 or 48 kHz usually) ->
// 16 kHz mono int16 chunks of ~20 ms, posted to the page.
//
// Resampling happens here, on the audio thread, so the page never sees the raw rate and the
// gateway gets exactly what the model's front end wants. A windowed-sinc low-pass (Blackman,
// 8 zero crossings each side, cut-off a little under the new Nyquist) evaluated at each
// output instant from a table of 256 fractional phases keeps speech free of aliasing for any
// input rate, integer ratio or not.

const PHASES = 256;
const ZERO_CROSSINGS = 8;

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const fc = (0.5 * Math.min(1, outRate / inRate)) * 0.92; // cycles per input sample
    this.halfWidth = ZERO_CROSSINGS / (2 * fc); // kernel half width in input samples
    this.k = Math.ceil(this.halfWidth);
    this.taps = 2 * this.k;
    this.table = new Float32Array(PHASES * this.taps);
    for (let ph = 0; ph < PHASES; ph++) {
      const frac = ph / PHASES;
      let sum = 0;
      for (let i = 0; i < this.taps; i++) {
        const t = frac + this.k - 1 - i; // distance from the output instant, input samples
        let h = 0;
        if (Math.abs(t) < this.halfWidth) {
          const x = 2 * fc * t;
          const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
          const w = 0.42 + 0.5 * Math.cos((Math.PI * t) / this.halfWidth) + 0.08 * Math.cos((2 * Math.PI * t) / this.halfWidth);
          h = sinc * w;
        }
        this.table[ph * this.taps + i] = h;
        sum += h;
      }
      for (let i = 0; i < this.taps; i++) this.table[ph * this.taps + i] /= sum; // DC gain 1
    }
    this.buf = new Float32Array(16384);
    this.bufStart = -this.k; // absolute index of buf[0]; zeros before the first sample
    this.bufLen = this.k;
    this.pos = 0; // absolute input position of the next output sample
  }

  /** Append input samples; call `emit(sample)` for every output sample now computable. */
  push(input, emit) {
    this.#append(input);
    const end = this.bufStart + this.bufLen; // first absolute index not yet received
    while (Math.floor(this.pos) + this.k < end) {
      const base = Math.floor(this.pos);
      const phase = Math.min(PHASES - 1, Math.floor((this.pos - base) * PHASES));
      const row = phase * this.taps;
      const first = base - this.k + 1 - this.bufStart;
      let acc = 0;
      for (let i = 0; i < this.taps; i++) acc += this.buf[first + i] * this.table[row + i];
      emit(acc);
      this.pos += this.step;
    }
  }

  #append(input) {
    // Drop what no future output needs, then grow if still short.
    const keepFrom = Math.floor(this.pos) - this.k + 1 - this.bufStart;
    if (keepFrom > 0 && this.bufLen + input.length > this.buf.length) {
      this.buf.copyWithin(0, keepFrom, this.bufLen);
      this.bufStart += keepFrom;
      this.bufLen -= keepFrom;
    }
    if (this.bufLen + input.length > this.buf.length) {
      const bigger = new Float32Array(2 * (this.bufLen + input.length));
      bigger.set(this.buf.subarray(0, this.bufLen));
      this.buf = bigger;
    }
    this.buf.set(input, this.bufLen);
    this.bufLen += input.length;
  }
}

class Capture16k extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions ?? {};
    this.outRate = opts.targetRate ?? 16000;
    this.chunkSamples = opts.chunkSamples ?? 320; // 20 ms at 16 kHz
    this.resampler = new Resampler(sampleRate, this.outRate);
    this.chunk = new Int16Array(this.chunkSamples);
    this.fill = 0;
    this.energy = 0;
    this.mono = new Float32Array(128);
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
    this.emit = (s) => {
      const c = Math.max(-1, Math.min(1, s));
      this.chunk[this.fill++] = Math.round(c < 0 ? c * 32768 : c * 32767);
      this.energy += c * c;
      if (this.fill === this.chunkSamples) {
        const rms = Math.sqrt(this.energy / this.chunkSamples);
        // `currentTime` is the start of this render quantum: the chunk's last sample was
        // captured about then, which lets the page line frames up with the voice.
        this.port.postMessage({ samples: this.chunk, rms, endTime: currentTime }, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.chunkSamples);
        this.fill = 0;
        this.energy = 0;
      }
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const n = channels[0].length;
    if (this.mono.length !== n) this.mono = new Float32Array(n);
    if (channels.length === 1) {
      this.mono.set(channels[0]);
    } else {
      this.mono.fill(0);
      for (const ch of channels) for (let i = 0; i < n; i++) this.mono[i] += ch[i] / channels.length;
    }
    this.resampler.push(this.mono, this.emit);
    return true;
  }
}

registerProcessor("capture-16k", Capture16k);
