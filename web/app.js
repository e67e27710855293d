// The page: wires the connection, the avatar loader, the audio sources, the stream and the
// player to the controls, and says in words what is going on.

import { Connection, ConnectionLost, State, TimeoutError, defaultUrl } from "./connection.js";
import { loadFrames } from "./loader.js";
import { Player } from "./player.js";
import { FileSource, MicSource, decodeAudioFile, to16kInt16 } from "./capture.js";
import { StreamError, StreamSession } from "./stream.js";

const $ = (id) => document.getElementById(id);
const el = {
  connState: $("conn-state"),
  retryNow: $("retry-now"),
  canvasWrap: $("canvas-wrap"),
  canvas: $("avatar"),
  hint: $("stage-hint"),
  lookaheadInline: $("lookahead-inline"),
  error: $("error"),
  status: $("status"),
  model: $("model"),
  refresh: $("refresh-models"),
  progress: $("load-progress"),
  loadText: $("load-text"),
  infoFrames: $("info-frames"),
  infoSize: $("info-size"),
  infoBounds: $("info-bounds"),
  mic: $("mic"),
  stop: $("stop"),
  interrupt: $("interrupt"),
  file: $("audio-file"),
  playFile: $("play-file"),
  mode: $("mode"),
  level: $("level"),
  statConn: $("stat-conn"),
  statFps: $("stat-fps"),
  statLatency: $("stat-latency"),
  statLookahead: $("stat-lookahead"),
  statDropped: $("stat-dropped"),
  statFrames: $("stat-frames"),
  statWorker: $("stat-worker"),
  statInference: $("stat-inference"),
  settings: $("settings"),
  form: $("conn-form"),
  url: $("gateway-url"),
  token: $("token"),
};

const app = {
  connection: null,
  player: new Player(el.canvas),
  store: null, // FrameStore of the loaded model
  metadata: null,
  loading: null, // {model, controller, promise}
  audioCtx: null,
  session: null,
  source: null, // MicSource or FileSource feeding the session
  decodedFile: null, // {file, buffer, pcm}
  lastEnded: null,
  recheckTimer: 0,
};
// A handle for the browser console and the browser tests; not used by the page itself.
window.lipsync = app;

// ---------------------------------------------------------------- messages

function say(text) {
  el.status.textContent = text;
}

function showError(text) {
  el.error.textContent = text;
  el.error.hidden = !text;
}

function hint(text) {
  el.hint.textContent = text;
  el.hint.hidden = !text;
}

function errorText(err) {
  if (err instanceof ConnectionLost) return "the gateway went away";
  return err?.message ?? String(err);
}

// ---------------------------------------------------------------- connection

function gatewayUrl() {
  const typed = el.url.value.trim();
  if (typed) return typed;
  return location.protocol === "file:" ? "ws://127.0.0.1:8086/ws" : defaultUrl();
}

function onState({ state, retryInMs, everOpened, url, error }) {
  el.connState.dataset.state = state;
  el.retryNow.hidden = state !== State.WAITING;
  let text;
  if (state === State.OPEN) {
    text = "Connected";
  } else if (state === State.CONNECTING) {
    text = "Connecting…";
  } else if (state === State.WAITING) {
    const s = Math.max(1, Math.ceil(retryInMs / 1000));
    text = everOpened ? `Gateway gone, reconnecting in ${s} s` : `Cannot connect, retrying in ${s} s`;
    if (!everOpened) {
      showError(
        `Cannot connect to the gateway at ${url}. Is it running? If it needs an access ` +
          "token, enter it under “Connection settings” and press Connect.",
      );
      el.settings.open = true;
    }
  } else {
    text = "Not connected";
    if (error) showError(`Not connected: ${error}`);
  }
  el.connState.textContent = text;
  el.statConn.textContent = {
    [State.OPEN]: "Connected",
    [State.CONNECTING]: "Connecting",
    [State.WAITING]: "Reconnecting",
    [State.STOPPED]: "Not connected",
  }[state];
  if (state === State.OPEN) {
    showError("");
    onOpen();
  } else if (state === State.WAITING) {
    onLost(text);
  }
  updateButtons();
}

function connect() {
  app.connection?.stop();
  const connection = new Connection({ url: gatewayUrl(), token: el.token.value.trim() });
  connection.addEventListener("state", (e) => onState(e.detail));
  connection.addEventListener("protocol-error", (e) => say(`Ignored a message from the gateway: ${e.detail.error}`));
  connection.addEventListener("message", (e) => onUnsolicited(e.detail));
  app.connection = connection;
  connection.start();
}

function onUnsolicited(msg) {
  if (msg.type === "error") showError(`Gateway: ${msg.error}`);
}

async function onOpen() {
  await refreshModels();
}

/** The socket closed: a stream cannot survive that; the loaded frames can. */
function onLost(text) {
  if (app.session) {
    stopSource();
    app.session.close();
    app.session = null;
    showError("The stream stopped: the gateway went away. Talk again once it is back.");
  }
  say("");
  if (!app.store) hint(text);
}

// ---------------------------------------------------------------- models

const EMPTY_LIST_RECHECK_MS = 5000;

async function refreshModels() {
  clearTimeout(app.recheckTimer);
  let answer;
  try {
    answer = await app.connection.request({ type: "list_models" }, "list_models", 5000);
  } catch (err) {
    if (!(err instanceof ConnectionLost)) showError(`Cannot list the avatars: ${errorText(err)}`);
    return;
  }
  if (answer.error) {
    showError(`Cannot list the avatars: ${answer.error}`);
    return;
  }
  const models = Array.isArray(answer.models) ? answer.models.map(String) : [];
  const previous = el.model.value;
  el.model.replaceChildren(
    ...models.map((name) => {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      return option;
    }),
  );
  el.model.disabled = models.length === 0;
  el.refresh.disabled = false;
  if (models.length === 0) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "(no avatars)";
    el.model.append(option);
    showError(
      "No avatars available: no worker has a model loaded yet (workers take a while to start). " +
        "Start one with a models directory: lipsync worker --models-dir DIR. Checking again every 5 s.",
    );
    hint("No avatars available yet");
    // Workers join at any time: look again while connected.
    app.recheckTimer = setTimeout(() => app.connection.isOpen && refreshModels(), EMPTY_LIST_RECHECK_MS);
    return;
  }
  if (el.error.textContent.startsWith("No avatars")) showError("");
  const wanted = models.includes(previous) ? previous : (app.store?.modelName ?? models[0]);
  el.model.value = models.includes(wanted) ? wanted : models[0];
  const current = app.loading?.model ?? app.store?.modelName;
  if (el.model.value !== current || (!app.loading && app.store && app.store.loaded < app.store.count)) {
    loadModel(el.model.value);
  } else if (app.store && !app.loading) {
    say(readyText(app.store.modelName));
  }
}

function showMetadata(meta, store) {
  el.infoFrames.textContent = meta ? String(meta.frame_count) : "–";
  el.infoSize.textContent = store?.width ? `${store.width} × ${store.height}` : "–";
  el.infoBounds.textContent =
    meta && Array.isArray(meta.bounds) && meta.bounds.length === 4
      ? `(${meta.bounds.map((v) => Math.round(v)).join(", ")})`
      : "–";
}

function setProgress(done, total) {
  const pct = total ? Math.floor((100 * done) / total) : 0;
  el.progress.value = pct;
  el.loadText.textContent = `${pct} %`;
}

/** Load `model`'s metadata and all its full frames; a newer call cancels an older one. */
async function loadModel(model) {
  if (app.loading) {
    app.loading.controller.abort(new DOMException("another avatar was picked", "AbortError"));
    // Wait for its requests to finish: their answers name only a frame id, so they must not
    // be mistaken for the new avatar's.
    await app.loading.promise.catch(() => {});
  }
  if (app.session) await stopTalking();
  // Marked as loading before the first await, so Talk is off from the first moment.
  const loading = { model, controller: new AbortController(), promise: null };
  app.loading = loading;
  loading.promise = doLoad(model, loading.controller.signal);
  try {
    await loading.promise;
  } finally {
    if (app.loading === loading) app.loading = null;
    updateButtons();
  }
}

async function doLoad(model, signal) {
  showError("");
  setProgress(0, 1);
  hint(`Loading ${model}…`);
  say(`Loading ${model}…`);
  updateButtons();
  let meta;
  try {
    meta = await app.connection.request({ type: "get_metadata", model_name: model }, `metadata:${model}`, 5000);
  } catch (err) {
    if (!signal.aborted) loadFailed(model, `Cannot load ${model}: ${errorText(err)}`);
    return;
  }
  if (signal.aborted) return;
  if (!meta.success || !(meta.frame_count > 0)) {
    loadFailed(model, `Cannot load ${model}: ${meta.error || "it has no frames"}`);
    return;
  }
  showMetadata(meta, null);
  let result;
  try {
    result = await loadFrames(app.connection, model, meta.frame_count, {
      signal,
      onProgress: (done, total) => {
        if (!signal.aborted) setProgress(done, total);
      },
    });
  } catch (err) {
    if (!signal.aborted) loadFailed(model, `Loading ${model} stopped: ${errorText(err)}`);
    return;
  }
  if (signal.aborted) {
    result.store.close();
    return;
  }
  const { store, failed } = result;
  if (store.loaded === 0) {
    store.close();
    loadFailed(model, `Cannot load ${model}: no frame arrived (${failed[0]?.error ?? "unknown error"})`);
    return;
  }
  app.store?.close();
  app.store = store;
  app.metadata = meta;
  el.canvasWrap.style.setProperty("--ar", `${store.width} / ${store.height}`);
  showMetadata(meta, store);
  await app.player.setFrames(store);
  hint("");
  if (failed.length) {
    showError(`${failed.length} of ${store.count} frames of ${model} did not load (${failed[0].error}); they show as grey.`);
  }
  say(readyText(model));
}

/** Say why `model` did not load; the avatar loaded before (if any) stays in use. */
function loadFailed(model, message) {
  showError(app.store ? `${message} (still showing ${app.store.modelName})` : message);
  say("");
  if (app.store) {
    el.model.value = app.store.modelName;
    showMetadata(app.metadata, app.store);
    setProgress(1, 1);
  } else {
    hint(`${model} did not load`);
  }
}

function readyText(model) {
  return `${model} is ready: press “Talk into the microphone” and speak.`;
}

// ---------------------------------------------------------------- talking

function audioContext() {
  // Created on the first click (browsers only let a page start audio after a user gesture).
  app.audioCtx ??= new AudioContext({ latencyHint: "interactive" });
  if (app.audioCtx.state === "suspended") app.audioCtx.resume();
  return app.audioCtx;
}

/** The open stream, opened now if there is none. */
async function ensureSession() {
  if (app.session && !app.session.closed) return app.session;
  const session = new StreamSession(app.connection, app.player, audioContext(), {
    modelName: app.store.modelName,
    mode: el.mode.value,
  });
  session.addEventListener("error", (e) => {
    showError(`The stream failed: ${e.detail.message}`);
    if (app.session === session) {
      stopSource();
      session.close();
      app.session = null;
      updateButtons();
    }
  });
  session.addEventListener("ended", () => {
    if (app.session === session) {
      stopSource();
      app.session = null;
      app.lastEnded = session;
      say(endedText(session));
      updateButtons();
    }
  });
  app.session = session;
  updateButtons();
  try {
    const info = await session.open();
    const lookahead = (info.lookahead_ms / 1000).toFixed(2);
    el.lookaheadInline.textContent = `${lookahead} s`;
    el.statLookahead.textContent = `${info.lookahead_ms} ms`;
  } catch (err) {
    if (app.session === session) app.session = null;
    updateButtons();
    throw err;
  }
  return session;
}

function stopSource() {
  app.source?.stop();
  app.source = null;
  el.level.value = 0;
}

async function startMic() {
  showError("");
  el.mic.disabled = true;
  try {
    const session = await ensureSession();
    if (app.source) {
      stopSource();
      await session.interrupt();
    }
    const mic = new MicSource(audioContext(), ({ samples, rms, endTime }) => {
      session.sendAudio(samples, endTime);
      el.level.value = Math.min(1, rms * 4);
    });
    app.source = mic;
    await mic.start();
    say("Listening: speak, and watch the avatar's mouth.");
  } catch (err) {
    stopSource();
    showError(err instanceof StreamError ? `Cannot start the stream: ${err.message}` : errorText(err));
    if (app.session && !app.source) await stopTalking();
  } finally {
    updateButtons();
  }
}

async function playFile() {
  const file = el.file.files?.[0];
  if (!file) return;
  showError("");
  el.playFile.disabled = true;
  try {
    const ctx = audioContext();
    if (app.decodedFile?.file !== file) {
      say(`Reading ${file.name}…`);
      const buffer = await decodeAudioFile(file, ctx);
      app.decodedFile = { file, buffer, pcm: await to16kInt16(buffer) };
    }
    const { buffer, pcm } = app.decodedFile;
    const session = await ensureSession();
    if (app.source) {
      stopSource();
      await session.interrupt();
    }
    const t0 = ctx.currentTime + 0.05;
    session.beginEpoch(t0, { fixed: true });
    const source = new FileSource(ctx, buffer, pcm, {
      onChunk: ({ samples }) => session.sendAudio(samples),
      onSent: () => {
        // All audio is out: end the stream; its last frames still come and play.
        if (app.source === source && app.session === session) finishFile(session);
      },
    });
    app.source = source;
    // The sound of audio time t is heard when the frame for t is drawn.
    source.start(t0, session.delay - (ctx.outputLatency || ctx.baseLatency || 0));
    say(`Playing ${file.name} (${source.durationS.toFixed(1)} s); the sound waits for the frames.`);
  } catch (err) {
    stopSource();
    showError(err instanceof StreamError ? `Cannot start the stream: ${err.message}` : errorText(err));
  } finally {
    updateButtons();
  }
}

async function finishFile(session) {
  app.source = null; // let the playback finish on its own
  app.session = null;
  updateButtons();
  try {
    await session.stop();
    say(endedText(session));
  } catch (err) {
    if (!(err instanceof ConnectionLost)) showError(`The stream did not end cleanly: ${errorText(err)}`);
  }
  app.lastEnded = session;
}

function endedText(session) {
  const s = session.stats;
  return `Stream ended: ${s.received} frames (${s.idle} idle), ${session.dropped} dropped.`;
}

async function stopTalking() {
  const session = app.session;
  stopSource();
  app.session = null;
  updateButtons();
  if (!session) return;
  say("Stopping: the last frames are on their way…");
  try {
    await session.stop();
    say(endedText(session));
  } catch (err) {
    if (!(err instanceof ConnectionLost)) showError(`The stream did not end cleanly: ${errorText(err)}`);
  }
  app.lastEnded = session;
}

async function interrupt() {
  const session = app.session;
  if (!session) return;
  if (app.source instanceof FileSource) stopSource(); // the microphone keeps listening
  try {
    await session.interrupt();
    say(app.source ? "Interrupted: listening again." : "Interrupted.");
  } catch (err) {
    if (err instanceof StreamError) {
      // The gateway says the stream is gone.
      if (app.session === session) {
        stopSource();
        app.session = null;
      }
      showError(`The stream failed: ${err.message}`);
    } else if (!(err instanceof ConnectionLost)) {
      showError(`Interrupt failed: ${err instanceof TimeoutError ? "no answer from the gateway" : errorText(err)}`);
    }
  } finally {
    updateButtons();
  }
}

// ---------------------------------------------------------------- controls and stats

function updateButtons() {
  const open = app.connection?.isOpen ?? false;
  const ready = open && app.store !== null && !app.loading;
  const talking = app.session !== null;
  el.mic.disabled = !ready || app.source instanceof MicSource;
  el.playFile.disabled = !ready || !el.file.files?.length;
  el.stop.disabled = !talking;
  el.interrupt.disabled = !talking;
  el.mode.disabled = talking;
  el.model.disabled = !open || el.model.options.length === 0 || el.model.options[0].value === "";
  el.refresh.disabled = !open;
}

function updateStats() {
  const session = app.session ?? app.lastEnded;
  const player = app.player;
  el.statFps.textContent = app.session ? `${player.fps.toFixed(1)} fps` : "–";
  if (!session) return;
  const s = session.stats;
  el.statLatency.textContent = s.latencyMs === null ? "–" : `${Math.round(s.latencyMs)} ms`;
  el.statDropped.textContent = String(session.dropped);
  el.statFrames.textContent = `${s.received} (${s.idle} idle)`;
  el.statWorker.textContent = s.workerId || "–";
  el.statInference.textContent = s.processingMs ? `${s.processingMs.toFixed(0)} ms per frame` : "–";
}

el.model.addEventListener("change", () => {
  if (el.model.value) loadModel(el.model.value);
});
el.refresh.addEventListener("click", () => refreshModels());
el.mic.addEventListener("click", () => startMic());
el.stop.addEventListener("click", () => stopTalking());
el.interrupt.addEventListener("click", () => interrupt());
el.playFile.addEventListener("click", () => playFile());
el.file.addEventListener("change", () => updateButtons());
el.retryNow.addEventListener("click", () => app.connection?.retryNow());
el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("lipsync.url", el.url.value.trim());
  sessionStorage.setItem("lipsync.token", el.token.value.trim());
  connect();
});

el.url.value = sessionStorage.getItem("lipsync.url") ?? "";
el.url.placeholder = gatewayUrl();
el.token.value = sessionStorage.getItem("lipsync.token") ?? "";
setInterval(updateStats, 250);
connect();
