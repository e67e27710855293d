"""The browser client (web/) in a real headless Chromium against a real system.

The whole system runs as in production (``lipsync up``: supervisord, broker, one worker,
gateway) on free loopback ports with a tiny random-weight package. Chromium's fake
microphone plays a WAV of speech followed by silence, so the page talks to the system
exactly as a person would: the mouth region must change while the WAV speaks and show the
untouched avatar frame in its silence. Screenshots go to ``artifacts/`` for a human to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, Processes, free_port, wait_until
from supervisor.xmlrpc import SupervisorTransport


__all__: list[str] = []

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")

# Chromium itself logs a failed WebSocket handshake as a console error; while the gateway is
# down on purpose that is expected, and it is not the page's own doing.
BROWSER_OWN_ERRORS = re.compile(r"WebSocket connection to .* failed")


# ------------------------------------------------------------------------------ fixtures


PHRASES = ("Hello there, how are you?", "One, two, three, four.", "Watch my mouth move.")


def _speech_wav(path: Path, gap_s: float = 2.0, tail_s: float = 4.0) -> Path:
    """Three short espeak-ng phrases, `gap_s` of digital silence after each and `tail_s`
    more at the end; 16-bit mono.

    Several short phrases rather than one long one: on a CPU the model is far from real
    time, so a stream shows the first frames of each phrase and drops the rest; every
    phrase onset gives the test a fresh burst of speech frames."""
    espeak = shutil.which("espeak-ng")
    rate = 16_000  # without espeak-ng: silence only; the tests that need speech skip
    parts: list[bytes] = [] if espeak else [b"\0\0" * rate]
    for i, text in enumerate(PHRASES if espeak else ()):
        raw = path.with_name(f"phrase-{i}.wav")
        subprocess.run(
            [str(espeak), "-s", "160", "-w", str(raw), text], check=True, capture_output=True
        )
        with wave.open(str(raw), "rb") as src:
            rate, width, channels = src.getframerate(), src.getsampwidth(), src.getnchannels()
            assert (width, channels) == (2, 1), "espeak-ng writes 16-bit mono"
            parts += [src.readframes(src.getnframes()), b"\0\0" * int(gap_s * rate)]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(parts) + b"\0\0" * int(tail_s * rate))
    return path


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class System:
    port: int
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def gateway_pid(self) -> int:
        """The gateway's pid, from supervisord's XML-RPC interface (0 while it is down).

        Talks to the socket directly: supervisorctl would read the repo's supervisord.conf,
        whose variables this test process does not export."""
        transport = SupervisorTransport(None, None, f"unix://{self.run_dir / 'supervisor.sock'}")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            info = proxy.supervisor.getProcessInfo("gateway")
        finally:
            transport.close()
        return int(info["pid"]) if info["statename"] == "RUNNING" else 0

    def logs(self) -> str:
        parts = [f"--- lipsync up\n{self.log.read_text(errors='replace')[-3000:]}"]
        for p in sorted(self.run_dir.glob("*.log")):
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def system(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """`lipsync up --workers 1` on free ports, serving the tiny package; stopped at the end."""
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    env = {
        **os.environ,
        "LIPSYNC_RUN_DIR": str(run_dir),
        "LIPSYNC_BROKER_FRONTEND": f"tcp://127.0.0.1:{free_port()}",
        "LIPSYNC_BROKER_BACKEND": f"tcp://127.0.0.1:{free_port()}",
        "LIPSYNC_SPARE_WORKERS": "0",
        # CPU inference on a shared 2-core machine is far from real time: let frames be
        # later than a GPU deployment would allow, so some speech frames get through
        # (shared.config.StreamConfig: "a CPU demo may rather show late frames")
        "LIPSYNC_STREAM_GRACE_FRAMES": "75",
        "LIPSYNC_STREAM_TTL_MS": "4000",
    }
    log = run_dir / "up.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", "up", "--workers", "1"]
            + ["--models-dir", str(tiny_package), "--port", str(port), "--run-dir", str(run_dir)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    system = System(port=port, run_dir=run_dir, proc=proc, log=log, env=env)
    try:
        deadline = time.monotonic() + 240
        while _health(port) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the system did not become healthy\n{system.logs()}")
            time.sleep(0.5)
        yield system
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops every program
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _speech_wav(tmp_path_factory.mktemp("audio") / "speech-then-silence.wav")


needs_speech = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs espeak-ng to make the test speech"
)


@pytest.fixture(scope="module")
def browser(speech_wav: Path) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech_wav}",
            ],
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Console:
    """Every console error/warning and uncaught exception of a page."""

    def __init__(self, page: object) -> None:
        self.messages: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.messages.append(f"pageerror: {exc}"))

    def _console(self, msg: object) -> None:
        if msg.type in ("error", "warning"):
            self.messages.append(f"{msg.type}: {msg.text}")

    def problems(self, allow: re.Pattern[str] | None = None) -> list[str]:
        return [m for m in self.messages if allow is None or not allow.search(m)]


@pytest.fixture
def page(browser: object) -> Iterator[tuple[object, Console]]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    console = Console(page)
    try:
        yield page, console
    finally:
        context.close()


def _screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _open_and_load(page: object, system: System) -> None:
    page.goto(system.url)
    page.wait_for_function(
        "document.querySelector('#model option[value=\"tiny\"]') !== null", timeout=30_000
    )
    page.wait_for_function(
        "document.getElementById('load-text').textContent === '100 %'"
        " && !document.getElementById('mic').disabled",
        timeout=60_000,
    )


# Records what the canvas shows after every drawn frame, from an animation-frame loop that
# runs right after the player's own (so it sees each frame the player drew): the frame's tags,
# and how its mouth region differs from the preloaded full frame of the same id (0 = the
# untouched avatar frame), plus a hash of that region.
RECORDER_JS = """
() => {
  const app = window.lipsync;
  const canvas = document.getElementById('avatar');
  const probe = new OffscreenCanvas(canvas.width, canvas.height)
    .getContext('2d', {willReadFrequently: true});
  window.__drawn = [];
  let last = null;
  const sample = (d) => {
    let [x1, y1, x2, y2] = d.bounds;
    if (!(x2 > x1 && y2 > y1)) [x1, y1, x2, y2] = app.metadata.bounds;
    // two pixels in from the crop's edges: its scaled border blends with the frame under it
    const x = Math.ceil(x1) + 2, y = Math.ceil(y1) + 2;
    const w = Math.floor(x2) - 2 - x, h = Math.floor(y2) - 2 - y;
    probe.drawImage(canvas, 0, 0);
    const shown = probe.getImageData(x, y, w, h).data;
    probe.drawImage(app.store.peek(d.frameId), 0, 0, canvas.width, canvas.height);
    const ref = probe.getImageData(x, y, w, h).data;
    let diff = 0, hash = 0;
    for (let i = 0; i < shown.length; i++) {
      diff += Math.abs(shown[i] - ref[i]);
      hash = (Math.imul(hash, 31) + shown[i]) | 0;
    }
    return {seq: d.seq, idle: d.idle, composite: d.composite, frameId: d.frameId,
            audioMs: d.audioMs, diff: diff / shown.length, hash,
            ctx: app.audioCtx ? app.audioCtx.currentTime : null};
  };
  const loop = () => {
    const d = app.player.lastDrawn;
    if (d && d !== last) {
      last = d;
      window.__drawn.push(sample(d));
    }
    requestAnimationFrame(loop);
  };
  requestAnimationFrame(loop);
}
"""

STATS_JS = """
() => {
  const s = window.lipsync.session ?? window.lipsync.lastEnded;
  return {received: s.stats.received, idle: s.stats.idle, dropped: s.dropped,
          serverDropped: s.stats.serverDropped, skipped: window.lipsync.player.skipped,
          latency: s.stats.latencyMs, worker: s.stats.workerId,
          fps: document.getElementById('stat-fps').textContent,
          lookahead: document.getElementById('stat-lookahead').textContent};
}
"""


def _longest_run(seqs: list[int]) -> int:
    """Longest stretch of consecutive sequence numbers."""
    best = run = 1 if seqs else 0
    for prev, cur in zip(seqs, seqs[1:], strict=False):
        run = run + 1 if cur == prev + 1 else 1
        best = max(best, run)
    return best


# ------------------------------------------------------------------------------ tests


def test_page_lists_and_loads_the_avatar(page, system):
    """The model list fills, every full frame loads, the canvas has the frame's size."""
    page, console = page
    _open_and_load(page, system)
    state = page.evaluate(
        """() => ({
          badge: document.getElementById('conn-state').textContent,
          options: [...document.querySelectorAll('#model option')].map(o => o.value),
          canvas: (c => [c.width, c.height])(document.getElementById('avatar')),
          frames: document.getElementById('info-frames').textContent,
          size: document.getElementById('info-size').textContent,
          loaded: window.lipsync.store.loaded,
          ids: [...document.querySelectorAll('[id]')].map(e => e.id),
          box: (() => { const r = document.getElementById('avatar').getBoundingClientRect();
                        return [r.width, r.height]; })(),
        })"""
    )
    assert state["badge"] == "Connected"
    assert state["options"] == ["tiny"]
    assert state["canvas"] == [320, 240]
    assert state["frames"] == "16" and state["loaded"] == 16
    assert state["size"] == "320 × 240"
    assert len(state["ids"]) == len(set(state["ids"])), "element ids must be unique"
    width, height = state["box"]
    assert width > 320 and abs(width / height - 320 / 240) < 0.02, "scaled at its aspect ratio"
    _screenshot(page, "browser-loaded.png")
    assert console.problems() == []


def test_keyboard_reaches_the_talk_button(page, system):
    """Tab moves through real controls to the microphone button, with a visible focus ring."""
    page, console = page
    _open_and_load(page, system)
    seen = []
    for _ in range(20):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id"))
        if seen[-1] == "mic":
            break
    assert "mic" in seen, seen
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    assert console.problems() == []


def test_phone_layout_fits_the_screen(browser, system):
    """On a phone-sized screen nothing scrolls sideways and the canvas fits the width."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        console = Console(page)
        _open_and_load(page, system)
        widths = page.evaluate(
            """() => ({doc: document.documentElement.scrollWidth, view: window.innerWidth,
                      canvas: document.getElementById('avatar').getBoundingClientRect().width})"""
        )
        assert widths["doc"] <= widths["view"]
        assert widths["canvas"] <= widths["view"]
        _screenshot(page, "browser-phone.png")
        assert console.problems() == []
    finally:
        context.close()


@needs_speech
def test_microphone_moves_the_mouth_with_speech_only(page, system):
    """Talk through the fake microphone: frames come steadily; while the WAV speaks the
    mouth region shows model output (differs from the avatar frame, and changes), in its
    silence it is exactly the preloaded avatar frame."""
    page, console = page
    _open_and_load(page, system)
    page.evaluate(RECORDER_JS)
    page.click("#mic")
    page.wait_for_function("window.lipsync.player.drawn > 0", timeout=30_000)
    started = time.monotonic()
    page.wait_for_function(
        "window.lipsync.player.lastDrawn && !window.lipsync.player.lastDrawn.idle",
        timeout=30_000,
        polling=10,
    )
    _screenshot(page, "browser-talking.png")  # a frame with the model's mouth
    # The WAV (three phrases with silence between, ~16 s) loops: this sees ~5 phrases.
    page.wait_for_timeout(max(0.0, 26 - (time.monotonic() - started)) * 1000)
    drawn = page.evaluate("window.__drawn")
    stats = page.evaluate(STATS_JS)
    page.click("#stop")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Stream ended')", timeout=30_000
    )

    speech = [d for d in drawn if not d["idle"]]
    silence = [d for d in drawn if d["idle"]]
    print(
        f"\nbrowser: {len(drawn)} frames drawn, {len(speech)} speech, {len(silence)} idle; {stats}"
    )
    assert len(speech) >= 3, "frames with inference were drawn while the WAV spoke"
    assert len(silence) >= 25, "idle frames were drawn in the WAV's silence"
    assert all(d["diff"] == 0 for d in silence), "silence shows the untouched avatar frame"
    assert all(d["diff"] > 0 for d in speech), "speech shows model output in the mouth region"
    assert len({d["hash"] for d in speech}) > 1, "the mouth region changes while speaking"
    seqs = [d["seq"] for d in drawn]
    assert seqs == sorted(seqs), "frames are drawn in sequence order"
    assert _longest_run(seqs) >= 25, "a second of frames drawn one after another, none skipped"
    assert stats["worker"], "tagged frames name the worker that served them"
    assert stats["lookahead"].endswith(" ms")
    assert console.problems() == []


@needs_speech
@pytest.mark.parametrize("mode", ["crop", "composite"])
def test_audio_file_plays_and_ends_by_itself(page, system, speech_wav, mode):
    """A chosen file is streamed at real-time pace and played back, each frame shown no
    earlier than its sound; in composite mode frames come whole. The stream ends by itself
    after the file."""
    page, console = page
    _open_and_load(page, system)
    page.evaluate(RECORDER_JS)
    page.select_option("#mode", mode)
    page.set_input_files("#audio-file", str(speech_wav))
    page.click("#play-file")
    page.wait_for_function("window.lipsync.player.drawn > 10", timeout=30_000)
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Stream ended')",
        timeout=60_000,
    )
    drawn = page.evaluate("window.__drawn")
    ended = page.evaluate(
        """() => { const s = window.lipsync.lastEnded;
                   return {...s.stats, t0: s.t0, delay: s.delay, fixed: s.fixedDelay}; }"""
    )
    assert ended["received"] > 0 and ended["idle"] > 0
    assert all(d["composite"] == (mode == "composite") for d in drawn)
    assert ended["fixed"], "a playing file keeps its delay"
    # the sound of audio time t plays at t0 + delay + t: no frame is drawn before that
    assert all(d["ctx"] >= ended["t0"] + d["audioMs"] / 1000 + ended["delay"] for d in drawn)
    assert console.problems() == []


def test_interrupt_keeps_the_stream_and_the_microphone(page, system):
    """Barge-in: Interrupt drops what is queued, the stream stays open and the microphone
    keeps feeding it, so frames keep coming; Stop then ends it."""
    page, console = page
    _open_and_load(page, system)
    page.click("#mic")
    page.wait_for_function("window.lipsync.player.drawn > 5", timeout=30_000)
    stream = page.evaluate("window.lipsync.session.id")
    page.click("#interrupt")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Interrupted')", timeout=15_000
    )
    after = page.evaluate("window.lipsync.player.drawn")
    page.wait_for_function(f"window.lipsync.player.drawn > {after + 5}", timeout=30_000)
    assert page.evaluate("window.lipsync.session.id") == stream, "still the same stream"
    assert page.is_enabled("#stop") and page.is_enabled("#interrupt")
    page.click("#stop")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Stream ended')", timeout=30_000
    )
    assert page.is_enabled("#mic")
    assert console.problems() == []


def test_page_reconnects_after_the_gateway_restarts(page, system):
    """SIGKILL the gateway mid-stream: the page says the stream stopped and counts down;
    supervisord restarts the gateway and the page reconnects and lists the models by
    itself, ready to talk again."""
    page, console = page
    _open_and_load(page, system)
    page.click("#mic")
    page.wait_for_function("window.lipsync.player.drawn > 0", timeout=30_000)
    pid = system.gateway_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    page.wait_for_function(
        "document.getElementById('conn-state').dataset.state === 'waiting'", timeout=20_000
    )
    text = page.text_content("#conn-state")
    assert re.fullmatch(r"Gateway gone, reconnecting in \d+ s", text), text
    assert "The stream stopped" in page.text_content("#error")
    assert page.evaluate("window.lipsync.session === null && window.lipsync.source === null")
    _screenshot(page, "browser-reconnecting.png")
    page.wait_for_function(
        "document.getElementById('conn-state').dataset.state === 'open'", timeout=60_000
    )
    assert system.gateway_pid() not in (0, pid), "a new gateway process serves the page"
    page.wait_for_function(
        "document.querySelector('#model option[value=\"tiny\"]') !== null"
        " && !document.getElementById('mic').disabled",
        timeout=30_000,
    )
    assert page.text_content("#error") == "", "the error went away with the reconnect"
    assert console.problems(allow=BROWSER_OWN_ERRORS) == []


def test_loader_retries_a_failing_frame_and_keeps_the_rest(page, system):
    """Frames that fail (here: two ids past the end, which the gateway refuses) are asked
    for again a few times and reported, while every other frame still loads."""
    page, console = page
    _open_and_load(page, system)
    result = page.evaluate(
        """async () => {
          const {loadFrames} = await import('./loader.js');
          const sent = [];
          const conn = window.lipsync.connection;
          const request = conn.request.bind(conn);
          conn.request = (msg, key, ms) => {
            sent.push(msg.frame_id);
            return request(msg, key, ms);
          };
          try {
            const {store, failed} = await loadFrames(conn, 'tiny', 18, {retries: 2});
            return {loaded: store.loaded, failed, sent};
          } finally { conn.request = request; }
        }"""
    )
    assert result["loaded"] == 16
    assert sorted(f["frameId"] for f in result["failed"]) == [16, 17]
    assert all("frame_out_of_range" in f["error"] for f in result["failed"])
    assert result["sent"].count(16) == 3 and result["sent"].count(0) == 1, "retried, alone"
    assert console.problems() == []


def test_no_models_says_so(browser, processes: Processes):
    """A gateway whose broker has no worker: the page says there is no avatar, and why."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    processes.start("broker", "--frontend", frontend, "--backend", backend)
    processes.start("gateway", "--broker", frontend, "--port", str(port))
    wait_until(lambda: _health(port) != 0, timeout=60, what="the gateway to listen")
    context = browser.new_context()
    try:
        page = context.new_page()
        console = Console(page)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function(
            "document.getElementById('error').textContent.includes('No avatars')", timeout=30_000
        )
        assert page.is_disabled("#mic")
        assert page.is_disabled("#model")
        assert console.problems() == []
    finally:
        context.close()


def test_token_is_asked_for_and_sent(browser, processes: Processes):
    """A gateway that needs a token refuses the page until the token is entered in the
    settings form; then the page connects (the token travels as ?token=)."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    processes.start("broker", "--frontend", frontend, "--backend", f"tcp://127.0.0.1:{free_port()}")
    processes.start(
        "gateway", "--broker", frontend, "--port", str(port), env={"LIPSYNC_TOKEN": "s3cret"}
    )
    wait_until(lambda: _health(port) != 0, timeout=60, what="the gateway to listen")
    context = browser.new_context()
    try:
        page = context.new_page()
        console = Console(page)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function(
            "document.getElementById('error').textContent.includes('Cannot connect')",
            timeout=30_000,
        )
        assert page.evaluate("document.getElementById('settings').open")
        assert page.text_content("#conn-state").startswith("Cannot connect, retrying in")
        page.fill("#token", "s3cret")
        page.click("#connect")
        page.wait_for_function(
            "document.getElementById('conn-state').dataset.state === 'open'", timeout=30_000
        )
        # connected: the next thing the page says is that this gateway has no avatar
        page.wait_for_function(
            "document.getElementById('error').textContent.includes('No avatars')", timeout=30_000
        )
        assert console.problems(allow=BROWSER_OWN_ERRORS) == []
    finally:
        context.close()


def test_protocol_module_matches_the_python_codecs(page, system):
    """web/protocol.js writes and reads the same bytes as the gateway's codecs: the audio
    chunk it sends, the tagged frames and video frames it receives."""
    from shared.browser import ResponseC, VideoFrameD
    from shared.streamproto import TaggedFrame, encode_audio_chunk, encode_tagged_frame

    page, console = page
    page.goto(system.url)
    pcm = np.array([0, 1, -1, 32767, -32768, 1234], dtype="<i2")
    tagged = TaggedFrame(
        stream=0xDEADBEEF,
        seq=7,
        frame_id=12,
        audio_ms=280,
        flags=0b011,
        bounds=(10.5, 20.0, 110.25, 140.0),
        processing_us=12345,
        worker="worker_00@héte",
        image=b"\xff\xd8jpeg",
    )
    video = VideoFrameD(frame_id=9, video_type="full_body", image=b"\xff\xd8JPG")
    result = ResponseC(frame_id=3, processing_time_ms=31, image=b"\xff\xd8C", bounds=(1, 2, 3, 4))
    got = page.evaluate(
        """async ([pcm, tagged, video, result]) => {
          const p = await import('./protocol.js');
          const buf = (bytes) => new Uint8Array(bytes).buffer;
          const plain = (o) => Object.fromEntries(Object.entries(o).map(
            ([k, v]) => [k, v instanceof Uint8Array ? [...v] : v]));
          return {
            chunk: [...new Uint8Array(p.encodeAudioChunk(0x01020304, Int16Array.from(pcm)))],
            tagged: plain(p.parseTaggedFrame(buf(tagged))),
            video: plain(p.parseVideoFrame(buf(video))),
            result: plain(p.parseInferenceResult(buf(result))),
            kinds: [tagged, video, result].map((b) => p.binaryKind(buf(b))),
          };
        }""",
        [
            pcm.tolist(),
            list(encode_tagged_frame(tagged)),
            list(video.serialize()),
            list(result.serialize()),
        ],
    )
    assert bytes(got["chunk"]) == encode_audio_chunk(0x01020304, pcm.tobytes())
    t = got["tagged"]
    assert (t["stream"], t["seq"], t["frameId"], t["audioMs"]) == (0xDEADBEEF, 7, 12, 280)
    assert (t["idle"], t["composite"], t["noImage"]) == (True, True, False)
    assert t["bounds"] == [10.5, 20.0, 110.25, 140.0]
    assert (t["processingUs"], t["workerId"]) == (12345, "worker_00@héte")
    assert bytes(t["image"]) == tagged.image
    v = got["video"]
    assert (v["frameId"], v["videoType"], bytes(v["jpeg"])) == (9, "full_body", video.image)
    r = got["result"]
    assert (r["success"], r["frameId"], r["processingMs"]) == (True, 3, 31)
    assert (bytes(r["image"]), r["bounds"]) == (result.image, [1, 2, 3, 4])
    assert got["kinds"] == ["tagged_frame", "video_frame", "inference"]
    assert console.problems() == []
