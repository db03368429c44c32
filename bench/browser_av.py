"""The page in Chromium over ~60 s of speech: decoded fps, jitter buffers, and the A/V
offset as the browser plays it, next to an aiortc client's figure (issue #9).

Run by hand (needs Debian's ``chromium``, the ``playwright`` Python package and the
demo recordings in ``../shared/media``; without them it prints a ``skipped`` reason)::

    .venv/bin/python bench/browser_av.py [--seconds 60] [--aiortc whep|none] [--out r.json]

What it does:

- Starts ``app.py`` (default model, ``--tts piper``), opens the project's page in
  headless Chromium (``bench/browser_check.py``'s flags and Start), and injects a
  probe into the page (``PROBE_JS``):
  - per presented video frame (``video.requestVideoFrameCallback``): its
    ``expectedDisplayTime`` (performance.now() ms) and the mouth motion, the mean
    absolute grey-level difference of the mouth box from the frame shown when the
    box was set (the idle face). The box is found here, in Python, by
    ``client.mouth_box`` on a full-size canvas capture of the idle video;
  - the audio as played: the page's received stream -> ``MediaStreamSource`` -> an
    AudioWorklet posting the RMS of every 10 ms block with its context time;
    ``AudioContext.getOutputTimestamp()`` every 250 ms maps context time to
    performance time (a straight-line fit); ``baseLatency``/``outputLatency`` are
    recorded;
  - ``getStats()`` every second (browser_check's ``STATS_JS`` plus the candidate
    pair's round-trip time).
- Pushes ~60 s of real speech (``yongen.wav`` and ``sun.wav`` in turn, 0.8 s of
  silence between) through ``/humanaudio`` as one upload, with the session's token.
- With ``--aiortc whep`` an aiortc client (``client.WhepViewer``) watches the same
  session over WHEP at the same time and is measured with ``client.av_offset``
  (media time, as in ``bench/av_offset.py``).
- The browser's offset: ``client.best_lag`` (the core of ``client.av_offset``) on the
  mouth motion at display times and the audio envelope (40 ms RMS) at played times,
  lags +-200 ms in 5 ms steps; positive = video late. Also per 10 s window (drift).

Played time of the voice, four readings (``audio_readings``; see ``analyse``): the
probe's blocks at getOutputTimestamp() time (main) or at render time, and the
``<audio>`` element's pulls from the jitter buffer (getStats energy, coarse) without
or with ``outputLatency``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.browser_check import STATS_JS, jitter_buffer_ms, launch, start_page  # noqa: E402
from bench.common import MEDIA, emit  # noqa: E402
from clock import SAMPLE_RATE  # noqa: E402

RECORDINGS = ("yongen.wav", "sun.wav")
GAP_S = 0.8  # silence between recordings
MAX_LAG_S, STEP_S = 0.2, 0.005
WINDOW_S = 10.0  # drift windows
ENVELOPE_S = 0.04  # RMS window of the audio envelope (as client.audio_envelope)
TARGET_MS = 40.0  # the lip-sync bound the interpretation checks against

# Installed once the page shows video. window.avlab collects; avlab.setBox(box) sets the
# mouth box (full-size video pixels) and takes the next frame's box as the reference.
PROBE_JS = """async (statsSource) => {
  const v = document.getElementById('video');
  const lab = {frames: [], audio: [], clock: [], stats: [], box: null, ref: null, info: {}};
  window.avlab = lab;
  const cv = document.createElement('canvas');
  const g = cv.getContext('2d', {willReadFrequently: true});
  const gray = (img) => {
    const d = img.data, out = new Float32Array(d.length / 4);
    for (let i = 0, j = 0; i < d.length; i += 4, j++) out[j] = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
    return out;
  };
  lab.setBox = (box) => { lab.box = box; lab.ref = null; };
  lab.capture = () => {
    cv.width = v.videoWidth; cv.height = v.videoHeight; g.drawImage(v, 0, 0);
    return cv.toDataURL('image/png');
  };
  const onFrame = (now, m) => {
    let motion = null;
    if (lab.box) {
      const [x1, y1, x2, y2] = lab.box;
      if (cv.width !== v.videoWidth || cv.height !== v.videoHeight) { cv.width = v.videoWidth; cv.height = v.videoHeight; }
      g.drawImage(v, 0, 0);
      const px = gray(g.getImageData(x1, y1, x2 - x1, y2 - y1));
      if (!lab.ref) lab.ref = px;
      let s = 0;
      for (let i = 0; i < px.length; i++) s += Math.abs(px[i] - lab.ref[i]);
      motion = s / px.length;
    }
    lab.frames.push([m.expectedDisplayTime, m.presentationTime, now, m.presentedFrames, m.mediaTime,
                     m.rtpTimestamp ?? null, m.receiveTime ?? null, motion]);
    v.requestVideoFrameCallback(onFrame);
  };
  v.requestVideoFrameCallback(onFrame);

  const worklet = `class RmsProbe extends AudioWorkletProcessor {
    constructor() { super(); this.n = Math.round(sampleRate / 100); this.acc = 0; this.k = 0; this.t0 = 0; this.buf = []; }
    process(inputs) {
      const ch = inputs[0], len = ch.length ? ch[0].length : 128;
      for (let i = 0; i < len; i++) {
        if (this.k === 0) this.t0 = (currentFrame + i) / sampleRate;
        let x = 0;
        for (let c = 0; c < ch.length; c++) x += ch[c][i];
        x = ch.length ? x / ch.length : 0;
        this.acc += x * x;
        if (++this.k === this.n) {
          this.buf.push(this.t0, Math.sqrt(this.acc / this.n)); this.acc = 0; this.k = 0;
          if (this.buf.length >= 40) { this.port.postMessage(this.buf); this.buf = []; }
        }
      }
      return true;
    }
  }
  registerProcessor('rms-probe', RmsProbe);`;
  const ctx = new AudioContext({latencyHint: 'interactive'});
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([worklet], {type: 'application/javascript'})));
  const node = new AudioWorkletNode(ctx, 'rms-probe', {numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1]});
  const mute = ctx.createGain();
  mute.gain.value = 0;  // the <audio> element plays the voice; the probe only listens
  ctx.createMediaStreamSource(document.getElementById('audio').srcObject).connect(node).connect(mute).connect(ctx.destination);
  node.port.onmessage = (e) => { for (const x of e.data) lab.audio.push(x); };
  await ctx.resume();
  const sampleClock = () => {
    const ts = ctx.getOutputTimestamp();
    lab.clock.push([ts.contextTime, ts.performanceTime, ctx.currentTime, performance.now()]);
  };
  setInterval(sampleClock, 250);
  lab.info = {sampleRate: ctx.sampleRate, baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency, state: ctx.state};
  lab.latency = () => ({baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency, state: ctx.state});

  // the audio as the <audio> element's renderer pulls it from the jitter buffer: getStats'
  // totalAudioEnergy grows at each 10 ms pull (WebRTC caches reports for ~50 ms)
  const audioReceiver = pc.getReceivers().find(r => r.track && r.track.kind === 'audio');
  lab.energy = [];
  lab.info.timeOrigin = performance.timeOrigin;
  setInterval(async () => {
    (await audioReceiver.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp') lab.energy.push([r.timestamp, performance.now(), r.totalAudioEnergy, r.totalSamplesDuration]);
    });
  }, 20);

  const readStats = eval(statsSource);
  setInterval(async () => {
    const s = await readStats();
    let rtt = null;
    (await pc.getStats()).forEach(r => {
      if (r.type === 'candidate-pair' && r.nominated && r.currentRoundTripTime !== undefined) rtt = r.currentRoundTripTime;
    });
    lab.stats.push({t: performance.now(), inbound: s, rtt});
  }, 1000);
  return lab.info;
}"""
COLLECT_JS = ("() => ({frames: avlab.frames, audio: avlab.audio, clock: avlab.clock, stats: avlab.stats, "
              "energy: avlab.energy, latency: avlab.latency()})")


def build_speech(seconds: float) -> np.ndarray | None:
    """float32 16 kHz mono: ``RECORDINGS`` in turn, GAP_S of silence after each, until at
    least ``seconds`` long; None when ../shared/media lacks them."""
    from audio import decode_audio

    paths = [MEDIA / name for name in RECORDINGS]
    if not all(p.exists() for p in paths):
        return None
    clips = [decode_audio(p.read_bytes(), max_seconds=600) for p in paths]
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    parts, n, i = [], 0, 0
    while n < seconds * SAMPLE_RATE:
        clip = clips[i % len(clips)]
        parts += [clip, gap]
        n += len(clip) + len(gap)
        i += 1
    return np.concatenate(parts).astype(np.float32)


def block_envelope(block_t: np.ndarray, block_rms: np.ndarray, times: np.ndarray,
                   window: float = ENVELOPE_S) -> np.ndarray:
    """RMS over ``window`` (s) centred on each of ``times`` (s), from per-block RMS values
    whose blocks are centred at ``block_t`` (s, increasing; equal-length blocks).
    float32 (len(times),); 0 where no block falls in the window."""
    sq = np.concatenate([[0.0], np.cumsum(np.asarray(block_rms, np.float64) ** 2)])
    lo = np.searchsorted(block_t, times - window / 2)
    hi = np.searchsorted(block_t, times + window / 2)
    n = hi - lo
    return np.sqrt(np.where(n > 0, (sq[hi] - sq[lo]) / np.maximum(n, 1), 0.0)).astype(np.float32)


def webaudio_times(audio: list, clock: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block centres at output, block centres at render, RMS) of the probe's 10 ms blocks,
    times in performance s. ``audio``: flat [context start s, rms, ...]; ``clock``: rows
    [getOutputTimestamp contextTime s, its performanceTime ms, currentTime s,
    performance.now() ms]; both mappings are straight-line fits over the run."""
    a = np.asarray(audio, np.float64).reshape(-1, 2)
    c = np.asarray(clock, np.float64)
    centre = a[:, 0] + 0.005
    ok = c[:, 1] > 0
    slope, icpt = np.polyfit(c[ok, 0], c[ok, 1], 1)
    render_slope, render_icpt = np.polyfit(c[:, 2], c[:, 3], 1)
    return (icpt + slope * centre) / 1000, (render_icpt + render_slope * centre) / 1000, a[:, 1]


def pulled_audio(energy: list, time_origin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The audio as the ``<audio>`` element's renderer pulled it from WebRTC's jitter
    buffer, from getStats rows [timestamp ms (epoch), performance.now() ms,
    totalAudioEnergy, totalSamplesDuration s]: (interval starts s, interval ends s,
    RMS per interval, fit residual p95 ms). Pull time of played duration D is the
    straight-line fit of report time on D (pulls are paced by the output device)."""
    e = np.asarray(energy, np.float64)
    e = e[np.unique(e[:, 3], return_index=True)[1]]
    e = e[e[:, 3] > 0]
    t = e[:, 0] - time_origin
    slope, icpt = np.polyfit(e[:, 3], t, 1)
    resid = float(np.percentile(np.abs(t - (icpt + slope * e[:, 3])), 95))
    d_e, d_d = np.diff(e[:, 2]), np.diff(e[:, 3])
    rms = np.sqrt(np.maximum(d_e / d_d, 0.0))
    return (icpt + slope * e[:-1, 3]) / 1000, (icpt + slope * e[1:, 3]) / 1000, rms, resid


def step_envelope(starts: np.ndarray, ends: np.ndarray, rms: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The RMS of the interval [starts, ends) holding each of ``times``; 0 outside all."""
    i = np.searchsorted(starts, times, side="right") - 1
    inside = (i >= 0) & (times < ends[np.clip(i, 0, len(ends) - 1)])
    return np.where(inside, rms[np.clip(i, 0, len(rms) - 1)], 0.0).astype(np.float32)


def speech_span(block_t: np.ndarray, rms: np.ndarray) -> tuple[float, float]:
    """First and last time (s) the played audio is above 5% of its 99th-percentile RMS."""
    loud = np.flatnonzero(rms > 0.05 * np.percentile(rms, 99))
    return float(block_t[loud[0]]), float(block_t[loud[-1]])


def browser_offsets(frames: list, envelope, span: tuple[float, float]) -> dict:
    """Offset (ms, positive = video late) and peak r of mouth motion at display times
    vs ``envelope(times s) -> RMS``: over ``span`` (+-0.5 s) and per WINDOW_S window;
    interpolated between frames and held (a frame stands until the next is shown)."""
    from client import best_lag

    f = np.asarray([(r[0], r[7]) for r in frames if r[7] is not None], np.float64)
    vt, motion = f[:, 0] / 1000, f[:, 1]
    order = np.argsort(vt, kind="stable")
    vt, motion = vt[order], motion[order]
    lo, hi = span[0] - 0.5, span[1] + 0.5

    def measure(a: float, b: float) -> dict:
        grid = np.arange(a, b, STEP_S)
        env = envelope(grid)
        lag, r = best_lag(vt, motion, grid, env, MAX_LAG_S, STEP_S)
        held, rh = best_lag(vt, motion, grid, env, MAX_LAG_S, STEP_S, held=True)
        return {"offset_ms": round(lag * 1000, 1), "r": round(r, 3), "held_offset_ms": round(held * 1000, 1),
                "held_r": round(rh, 3)}

    whole = measure(lo + MAX_LAG_S, hi - MAX_LAG_S)
    windows = [{"from_s": round(a - span[0], 1)} | measure(a, min(a + WINDOW_S, hi - MAX_LAG_S))
               for a in np.arange(span[0], hi - MAX_LAG_S - WINDOW_S / 2, WINDOW_S)]
    return whole | {"windows": windows}


def stats_summary(stats: list, span_perf: tuple[float, float]) -> dict:
    """Decoded fps, dropped frames, jitter-buffer delay per track (over the speech span,
    from counter deltas, plus the per-second range), packets lost, concealment, RTT."""
    inside = [s for s in stats if span_perf[0] <= s["t"] / 1000 <= span_perf[1]] or stats
    first, last = inside[0], inside[-1]
    dt = (last["t"] - first["t"]) / 1000
    out: dict = {"samples": len(inside), "seconds": round(dt, 1)}
    for kind in ("video", "audio"):
        a, b = first["inbound"].get(kind), last["inbound"].get(kind)
        if not a or not b:
            continue
        per_second = []
        for x, y in zip(inside, inside[1:]):
            xa, ya = x["inbound"].get(kind), y["inbound"].get(kind)
            if xa and ya:
                per_second.append(jitter_buffer_ms(ya["jitterBufferDelay"] - xa["jitterBufferDelay"],
                                                   ya["jitterBufferEmittedCount"] - xa["jitterBufferEmittedCount"]))
        per_second = [v for v in per_second if v is not None]
        row = {"jitter_buffer_ms": jitter_buffer_ms(b["jitterBufferDelay"] - a["jitterBufferDelay"],
                                                    b["jitterBufferEmittedCount"] - a["jitterBufferEmittedCount"]),
               "jitter_buffer_ms_per_second_min_max": [min(per_second), max(per_second)] if per_second else None,
               "packets_lost": b["packetsLost"]}
        if kind == "video":
            row |= {"decoded_fps": round((b["framesDecoded"] - a["framesDecoded"]) / dt, 2) if dt else None,
                    "frames_dropped": b["framesDropped"],
                    "frames_decoded": b["framesDecoded"]}
        else:
            total = b["totalSamplesReceived"] - a["totalSamplesReceived"]
            row["concealed_pct"] = round(100 * (b["concealedSamples"] - a["concealedSamples"]) / total, 2) if total else None
        out[kind] = row
    rtts = [s["rtt"] * 1000 for s in inside if s.get("rtt") is not None]
    out["rtt_ms_median"] = round(float(np.median(rtts)), 2) if rtts else None
    return out


def _wav(pcm: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def push_speech(url: str, sessionid: str, token: str | None, pcm: np.ndarray) -> dict:
    """``POST /humanaudio`` of ``pcm`` as a 16-bit wav for the page's session."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("sessionid", sessionid)
    form.add_field("file", _wav(pcm), filename="speech.wav")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/humanaudio", data=form, headers=headers) as r:
            return await r.json()


async def run(chromium: str, pcm: np.ndarray, aiortc: str, raw: Path | None = None) -> dict:
    import cv2
    from playwright.async_api import async_playwright

    from client import ServerProcess, WhepViewer, av_offset, mouth_box

    srv = ServerProcess(Path(tempfile.mkdtemp()), "--model", "default", "--tts", "piper", "--log_level", "WARNING")
    viewer = None
    try:
        async with async_playwright() as p:
            browser = await launch(p, chromium)
            page = await start_page(browser, srv.url)
            await page.wait_for_function("document.getElementById('audio').srcObject !== null", timeout=10000)
            info = await page.evaluate(PROBE_JS, STATS_JS)
            await asyncio.sleep(1.5)  # the encoder's quality settles during the first second
            png = await page.evaluate("avlab.capture()")
            idle = cv2.imdecode(np.frombuffer(base64.b64decode(png.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
            box = mouth_box(idle, scale=1.0)
            await page.evaluate("(b) => avlab.setBox(b)", list(box))
            sessionid, token = await page.evaluate("[sessionid, token]")
            if aiortc == "whep":
                viewer = WhepViewer(srv.url, sessionid, token)
                await viewer.connect()
                await asyncio.wait_for(viewer.first_video.wait(), 20)
            await asyncio.sleep(1.0)
            a_box = mouth_box(viewer.received.first_frame_bgr) if viewer else None
            if viewer:
                a_start, a_ref = viewer.received.video_t[-1], viewer.received.video[-1]
            pushed = await push_speech(srv.url, sessionid, token, pcm)
            if pushed.get("code") != 0:
                raise RuntimeError(f"/humanaudio refused the speech: {pushed}")
            await asyncio.sleep(len(pcm) / SAMPLE_RATE + 2.5)
            data = await page.evaluate(COLLECT_JS)
            speaking = await page.evaluate("document.getElementById('speaking').textContent")
            await page.evaluate("stop()")
            await browser.close()
        aiortc_row = None
        if viewer:
            rec = viewer.received
            rng = (a_start, rec.video_t[-1])
            lag, r = av_offset(rec, a_box, MAX_LAG_S, STEP_S, rng, a_ref)
            held, _ = av_offset(rec, a_box, MAX_LAG_S, STEP_S, rng, a_ref, held=True)
            n = len([t for t in rec.video_t if t >= a_start])
            aiortc_row = {"how": "client.WhepViewer on the same session, same run; client.av_offset on media time",
                          "offset_ms": round(lag * 1000, 1), "r": round(r, 3), "held_offset_ms": round(held * 1000, 1),
                          "frames": n, "fps": round(n / (rng[1] - rng[0]), 2)}
            await viewer.close()
            viewer = None
    finally:
        if viewer:
            await viewer.close()
        srv.stop()
    if raw:
        raw.write_text(json.dumps({"data": data, "info": info, "box": list(box), "aiortc": aiortc_row,
                                   "speaking": speaking}))
    return analyse(data, info, box, pcm, aiortc_row, speaking)


def analyse(data: dict, info: dict, box: tuple, pcm: np.ndarray, aiortc_row: dict | None, speaking: str) -> dict:
    """The figures from what the page collected (see ``run``).

    Audio readings (``audio_readings``), each the played time of the voice:
    ``webaudio_output`` (main): the AudioWorklet probe's 10 ms blocks at their
    getOutputTimestamp() time (Chromium's includes the output device's delay: it reads
    ``webaudio_output_minus_render_ms`` after the render time, about ``outputLatency``);
    ``webaudio_render``: the same blocks when the graph renders them (no output delay);
    ``element_pull``: when the ``<audio>`` element's renderer pulled the voice from the
    jitter buffer, from getStats' totalAudioEnergy/totalSamplesDuration (coarse: the
    reports come every ~60 ms and the fake sink pulls 60 ms at a time);
    ``element_output``: that plus ``outputLatency``. ``webaudio_render_minus_pull_ms``:
    the lag between the probe's and the element's envelopes (same coarseness)."""
    from client import best_lag

    latency = data["latency"]
    out_latency = latency.get("outputLatency") or 0.0
    wa_out, wa_render, wa_rms = webaudio_times(data["audio"], data["clock"])
    p_start, p_end, p_rms, p_resid = pulled_audio(data["energy"], info["timeOrigin"])
    span = speech_span(wa_out, wa_rms)
    envelopes = {
        "webaudio_output": lambda g: block_envelope(wa_out, wa_rms, g),
        "webaudio_render": lambda g: block_envelope(wa_render, wa_rms, g),
        "element_pull": lambda g: step_envelope(p_start, p_end, p_rms, g),
        "element_output": lambda g: step_envelope(p_start + out_latency, p_end + out_latency, p_rms, g),
    }
    offsets = {k: browser_offsets(data["frames"], env, span) for k, env in envelopes.items()}
    grid = np.arange(span[0], span[1], STEP_S)
    lag, r_audio = best_lag((p_start + p_end) / 2, p_rms, grid, block_envelope(wa_render, wa_rms, grid),
                            MAX_LAG_S, STEP_S, held=False)
    frames = [f for f in data["frames"] if span[0] <= f[0] / 1000 <= span[1]]
    shown = (frames[-1][3] - frames[0][3]) / (span[1] - span[0]) if len(frames) > 1 else None
    gaps = np.diff([f[0] for f in frames]) if len(frames) > 1 else np.zeros(1)
    return {
        "speech_s": round(len(pcm) / SAMPLE_RATE, 2),
        "played_speech_span_s": round(span[1] - span[0], 2),
        "mouth_box_full_size": list(box),
        "browser": {
            "offset": offsets["webaudio_output"],
            "audio_readings": {k: {x: v[x] for x in ("offset_ms", "r", "held_offset_ms")} for k, v in offsets.items()},
            "webaudio_render_minus_pull_ms": round(-lag * 1000, 1), "webaudio_vs_pull_r": round(r_audio, 3),
            "webaudio_output_minus_render_ms": round(float(np.median(wa_out - wa_render) * 1000), 1),
            "pull_clock_fit_residual_p95_ms": round(p_resid, 2),
            "presented_fps": round(shown, 2) if shown else None,
            "frame_callbacks": len(frames),
            "display_interval_ms_p50_p95_max": [round(float(np.percentile(gaps, q)), 1) for q in (50, 95)]
            + [round(float(gaps.max()), 1)],
            "stats": stats_summary(data["stats"], span),
            "audio_context": info | {"at_end": latency},
            "speaking_badge_at_end": speaking,
        },
        "aiortc": aiortc_row,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--seconds", type=float, default=60.0, help="at least this much speech (s)")
    ap.add_argument("--aiortc", choices=("whep", "none"), default="whep",
                    help="also measure an aiortc WHEP viewer of the same session")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--raw", type=Path, help="also write what the page collected (JSON) here")
    args = ap.parse_args()
    skip = None
    pcm = build_speech(args.seconds)
    if pcm is None:
        skip = f"no {' / '.join(RECORDINGS)} in {MEDIA}"
    elif not Path(args.chromium).exists():
        skip = f"no Chromium at {args.chromium} (apt-get install chromium)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            skip = "no playwright (.venv/bin/pip install playwright)"
    if skip:
        emit({"skipped": skip}, args.out)
        return
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = asyncio.run(run(args.chromium, pcm, args.aiortc, args.raw))
    emit({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "uptime_before": load,
                      "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                      "chromium": subprocess.run([args.chromium, "--version"], capture_output=True,
                                                 text=True).stdout.strip()},
          "date": time.strftime("%Y-%m-%d %H:%M"), "lag_step_ms": STEP_S * 1000, "max_lag_ms": MAX_LAG_S * 1000,
          "target_abs_offset_ms": TARGET_MS} | result, args.out)


if __name__ == "__main__":
    main()
