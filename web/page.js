// The demo page: one WebRTC session with the avatar, a chat with it (typed or spoken),
// and what the connection is doing.
//
// Before Start the page reads GET /config (ICE servers, whether an LLM is configured,
// the microphone modes), GET /avatars and GET /voices; the chosen avatar and voice go
// with the offer (and the voice with each /human). Events arrive on the session's
// "events" data channel (SSE /events as a fallback; /ws carries them too while it is
// open); one source drives the page. The microphone, chosen before Start:
//  - "lipsync": the mic rides the audio transceiver (sendrecv, offer mic: "lipsync"),
//    each talk spurt is mouthed; "Mic on/off" enables/disables the track.
//  - "websocket": lipsync over /ws: an AudioWorklet cuts the mic into 20 ms chunks,
//    sent as CRC-framed f32le PCM between {"type": "start"} and {"type": "end"}.
//  - "converse": the mic rides the transceiver (offer mic: "converse"); the server
//    finds the user's turns, transcribes them ("transcript" events) and the LLM's
//    reply is spoken; talking over the avatar stops it. On as soon as connected.
// Every mode with a mic runs the worklet for the level meter. Every failure is shown
// in the status line (and in the conversation log while a session is open).
"use strict";

const CHUNK_MS = 20;
const PCM_FORMAT = "f32le";
const SSE_FALLBACK_MS = 3000;     // open /events when the data channel is not open by then
const ICE_GATHER_TIMEOUT_MS = 4000; // send the offer with the candidates found by then (an unreachable STUN server)
const CONNECT_TIMEOUT_MS = 15000; // answer received -> connected, or the page gives up and says so
const REQUEST_TIMEOUT_MS = 15000; // an API call unanswered by then is reported (uploads: UPLOAD_TIMEOUT_MS)
const UPLOAD_TIMEOUT_MS = 120000;
const STATS_EVERY_MS = 1000;
const EVENT_LINES = 12;           // lines kept in the on-page event log
const ERROR_REPEAT_MS = 2000;     // one error arriving on two event sources is shown once
const METER_FLOOR_DB = -60;
const MIC_MODES = {  // value of the radio -> how it works
  off: {name: "off", offer: null, webrtc: false},
  lipsync: {name: "lipsync (WebRTC)", offer: "lipsync", webrtc: true},
  websocket: {name: "lipsync (WebSocket)", offer: null, webrtc: false},
  converse: {name: "converse", offer: "converse", webrtc: true},
};

let pc = null, sessionid = null, token = null, channel = null, ws = null, sse = null;
let connectTimer = null, statsTimer = null, stopping = false, connectedOnce = false;
const config = {loaded: false, ice_servers: [], chat: false, mic_modes: ["off", "lipsync"], api_key_required: false};
const eventLog = [];              // every event received: {..., source, at}; read by the browser tests
const liveStats = {};             // the stats panel's figures (numbers); read by the browser tests
const mic = { mode: "off", on: false, stream: null, track: null, ctx: null, node: null,
              seq: 0, sent: 0, dropped: 0, level: -Infinity };
const avatarLines = new Map();    // utterance -> its line in the conversation log
const failedUtterances = new Set(); // utterances an error event named (their "queued" must not hide it)
const recentErrors = new Map();   // error event's message -> when it last came

const $ = (id) => document.getElementById(id);
const selectedMode = () => document.querySelector('input[name="micmode"]:checked').value;
const sayMode = () => document.querySelector('input[name="saymode"]:checked').value;
const short = (sid) => sid ? sid.slice(0, 8) : "";

// -- status line and conversation log --------------------------------------------------------
function status(s, kind = "") {
  const el = $("status");
  el.textContent = s;
  el.className = kind;
}
const busy = (s) => status(s, "busy");

function showError(msg) {
  status(`error: ${msg}`, "error");
  logLine("error", "error", msg);
}

function logLine(kind, who, text) {
  const log = $("chatlog");
  const line = document.createElement("div");
  line.className = `line ${kind}`;
  if (who) {
    const w = document.createElement("span");
    w.className = "who"; w.textContent = `${who}:`;
    line.append(w);
  }
  const t = document.createElement("span");
  t.className = "text"; t.textContent = text;
  line.append(t);
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 30;
  log.append(line);
  if (atBottom) log.scrollTop = log.scrollHeight;
  return line;
}

function avatarSays(utterance, text) {
  const line = avatarLines.get(utterance);
  if (line) {
    const t = line.querySelector(".text");
    t.textContent = `${t.textContent} ${text}`;
  } else {
    avatarLines.set(utterance, logLine("avatar", "avatar", text));
  }
}

// -- HTTP ----------------------------------------------------------------------------------------
// With --api_key the server wants the key on /config, /avatars, /voices and /offer, then
// the session's token (from the answer) on the session's routes: a header where
// possible, ?token= for WebSocket/SSE.
function credential() { return token || $("apikey").value.trim(); }
function authHeaders(extra = {}) { const c = credential(); return c ? {...extra, Authorization: `Bearer ${c}`} : extra; }
function withToken(url) { const c = credential(); return c ? `${url}&token=${encodeURIComponent(c)}` : url; }

// The API's JSON answer plus the HTTP status; {code: -1, msg} for any failure (network
// down, a proxy's HTML error page, ...), never a throw.
async function request(path, init = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
  let r;
  const abort = new AbortController(), timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    r = await fetch(path, {...init, headers: authHeaders(init.headers || {}), signal: abort.signal});
  } catch (e) {
    return {code: -1, http: 0, msg: abort.signal.aborted ? `no answer from the server within ${timeoutMs / 1000} s (${path})`
                                                         : `the server cannot be reached (${path}: ${e.message || e})`};
  } finally {
    clearTimeout(timer);
  }
  let j;
  try { j = await r.json(); } catch (e) { j = {}; }
  if (typeof j !== "object" || j === null) j = {};
  if (!r.ok) return {...j, code: -1, http: r.status, msg: j.msg || `${path}: HTTP ${r.status} ${r.statusText}`};
  return {code: 0, ...j, http: r.status};
}

const post = (path, body) => request(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});

// A failed call on the session's routes: 404 means the server no longer has the session.
function sessionCallFailed(j, what) {
  if (j.http === 404 && sessionid) return sessionGone(`the server no longer has this session (${j.msg})`);
  if (j.http === 401) $("keybox").open = true;
  showError(`${what}: ${j.msg}`);
}

// -- configuration, avatars, voices ---------------------------------------------------------------
async function loadConfig() {
  const cfg = await request("/config");
  if (cfg.code !== 0) {
    if (cfg.http === 401) {
      $("keybox").open = true;
      showError(`this server needs its API key: enter it under "server key" (${cfg.msg})`);
    } else {
      showError(`cannot read the server's configuration: ${cfg.msg}`);
    }
    return false;
  }
  Object.assign(config, cfg);
  const [avatars, voices] = await Promise.all([request("/avatars"), request("/voices")]);
  fillAvatars(avatars);
  fillVoices(voices);
  applyFeatures();
  config.loaded = true;  // the pickers and features are in place
  if ($("status").className === "error" && !pc) status("not connected");
  return true;
}

function fillSelect(sel, items, chosen) {
  const keep = sel.value;
  sel.replaceChildren(...items.map(({value, label}) => new Option(label, value)));
  sel.value = items.some((i) => i.value === keep) ? keep : chosen;
}

function fillAvatars(j) {
  if (j.code !== 0) {
    showError(`cannot list the avatars: ${j.msg}`);
    return;
  }
  const ids = j.avatars && j.avatars.length ? j.avatars : [j.default || config.avatar];
  fillSelect($("avatar"), ids.map((id) => ({value: id, label: id})), j.default || ids[0]);
}

function fillVoices(j) {
  const sel = $("voice");
  if (j.code !== 0) {
    showError(`cannot list the voices: ${j.msg}`);
    return;
  }
  if (!j.voices || !j.voices.length) {
    sel.replaceChildren(new Option(j.engine ? `${j.engine} (default voice)` : "(no TTS engine)", ""));
    sel.disabled = true;
    return;
  }
  sel.disabled = false;
  fillSelect(sel, j.voices.map((v) => ({value: v.id, label: `${v.name || v.id}${v.gender ? ` (${v.gender})` : ""}`})),
             j.default || j.voices[0].id);
  sel.title = `${j.engine} voices`;
}

function applyFeatures() {
  // chat: only with an LLM; converse: with an LLM, on a server that offers the mode.
  const chatInput = document.querySelector('input[name="saymode"][value="chat"]');
  chatInput.disabled = !config.chat;
  $("chatlabel").classList.toggle("disabled", !config.chat);
  $("chathint").textContent = config.chat ? "" : "chat needs a server started with --llm_url";
  if (!config.chat && chatInput.checked) document.querySelector('input[name="saymode"][value="echo"]').checked = true;
  const converse = document.querySelector('input[name="micmode"][value="converse"]');
  const can = config.chat && (config.mic_modes || []).includes("converse");
  converse.dataset.available = can ? "1" : "";
  converse.disabled = !can || !!pc;
  $("converselabel").classList.toggle("disabled", !can);
  $("conversehint").textContent = can ? "" : !config.chat ? "converse needs --llm_url" : "this server has no converse mode";
  if (!can && converse.checked) { document.querySelector('input[name="micmode"][value="off"]').checked = true; onModeChange(); }
}

// -- events ------------------------------------------------------------------------------------
function onEvent(e, source) {
  eventLog.push({...e, source, at: performance.now()});
  // One source drives the page: the data channel when open, else SSE, else the socket.
  const primary = channel && channel.readyState === "open" ? "datachannel" : sse ? "sse" : "ws";
  if (source !== primary && e.type !== "error") return;
  if (e.type === "playback_started") {
    $("speaking").textContent = "speaking"; $("speaking").classList.add("speaking");
  } else if (e.type === "playback_finished") {
    $("speaking").textContent = e.interrupted ? "idle (cut)" : "idle"; $("speaking").classList.remove("speaking");
    if ($("subtitle").dataset.utterance === String(e.utterance)) $("subtitle").textContent = "";
    const line = avatarLines.get(e.utterance);
    if (line && e.interrupted) line.classList.add("cut");
  } else if (e.type === "text") {
    $("subtitle").textContent = e.text; $("subtitle").dataset.utterance = String(e.utterance);
    avatarSays(e.utterance, e.text);
  } else if (e.type === "transcript") {
    logLine("transcript", "you (voice)", e.text);
  } else if (e.type === "error") {
    if (e.utterance !== undefined) failedUtterances.add(e.utterance);
    const msg = `${e.msg}${e.seq !== undefined ? ` (message ${e.seq})` : ""}`, now = performance.now();
    if (now - (recentErrors.get(msg) ?? -Infinity) > ERROR_REPEAT_MS) showError(msg);
    recentErrors.set(msg, now);
  }
  const line = `${new Date().toLocaleTimeString()} [${source}] ${JSON.stringify(e)}`;
  const log = $("events");
  log.textContent = (log.textContent + line + "\n").split("\n").slice(-EVENT_LINES - 1).join("\n");
}

function parseEvent(text, source) {
  try { onEvent(JSON.parse(text), source); } catch (err) { console.warn("bad event", text, err); }
}

function openSSE() {
  if (sse || !sessionid) return;
  sse = new EventSource(withToken(`/events?sessionid=${encodeURIComponent(sessionid)}`));
  sse.onmessage = (ev) => parseEvent(ev.data, "sse");
}

// -- microphone ------------------------------------------------------------------------------------
async function openMic() {
  if (!navigator.mediaDevices) throw new Error("the microphone needs https or localhost");
  // Echo cancellation matters most in converse mode: the avatar's voice from the
  // speakers must not reach the server as the user's.
  try {
    mic.stream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true,
                                                                     noiseSuppression: true, autoGainControl: true}});
  } catch (e) {
    if (e.name === "NotAllowedError") throw new Error("the browser refused the microphone: allow it for this page, or choose microphone: off");
    if (e.name === "NotFoundError") throw new Error("no microphone found: plug one in, or choose microphone: off");
    throw e;
  }
  mic.track = mic.stream.getAudioTracks()[0];
  mic.ctx = new AudioContext();
  await mic.ctx.audioWorklet.addModule("/web/mic-worklet.js");
  mic.node = new AudioWorkletNode(mic.ctx, "mic-chunker", {processorOptions: {chunkMs: CHUNK_MS}});
  mic.node.port.onmessage = (ev) => onChunk(ev.data);
  mic.ctx.createMediaStreamSource(mic.stream).connect(mic.node);
  mic.node.connect(mic.ctx.destination);  // silent; keeps the worklet pulled
  await mic.ctx.resume();
}

function closeMic() {
  if (mic.stream) mic.stream.getTracks().forEach((t) => t.stop());
  if (mic.ctx) mic.ctx.close();
  mic.stream = mic.track = mic.ctx = mic.node = null;
  showLevel(-Infinity);
}

function onChunk(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  // The meter shows what the server gets: nothing while a WebRTC mic track is disabled.
  showLevel(mic.on ? 10 * Math.log10(sum / samples.length) : -Infinity);
  if (mic.mode !== "websocket" || !mic.on || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (ws.bufferedAmount > 64 * samples.length * 4) { mic.dropped++; return; }  // > ~1.3 s backlog
  ws.send(AvatarFraming.audioMessage(mic.seq++, AvatarFraming.pcmBytes(samples, PCM_FORMAT)));
  mic.sent++;
  if (mic.sent % 25 === 0) showMicState();
}

function showLevel(db) {
  // Falls at most 1.5 dB per chunk so the bar is readable.
  mic.level = Math.max(db, Math.max(METER_FLOOR_DB - 1, mic.level) - 1.5);
  const shown = mic.level < METER_FLOOR_DB ? -Infinity : mic.level;
  $("level").textContent = shown === -Infinity ? "\u2212\u221e dBFS" : `${shown.toFixed(1)} dBFS`;
  $("levelbar").style.width = `${Math.max(0, 100 * (1 - Math.max(shown, METER_FLOOR_DB) / METER_FLOOR_DB))}%`;
}

function showMicState() {
  let s = `mic: ${MIC_MODES[mic.mode].name}`;
  if (mic.mode !== "off") s += mic.on ? " \u2014 on" : " \u2014 off";
  if (mic.mode === "converse" && mic.on) s += " (just talk; talking over the avatar stops it)";
  if (mic.mode === "websocket" && mic.sent) {
    s += `, ${mic.sent} messages sent (${(mic.sent * CHUNK_MS / 1000).toFixed(1)} s)`;
    if (mic.dropped) s += `, ${mic.dropped} dropped`;
  }
  if (mic.mode === "websocket" && ws) s += ws.readyState === WebSocket.OPEN ? ", socket open" : ", socket not open";
  $("micstate").textContent = s;
  $("mic").textContent = mic.on ? "Mic off" : "Mic on";
}

function openSocket() {
  const url = withToken(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws?sessionid=${encodeURIComponent(sessionid)}`);
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => typeof ev.data === "string" && parseEvent(ev.data, "ws");
  ws.onopen = showMicState;
  ws.onclose = () => { if (mic.on && mic.mode === "websocket") setMic(false); showMicState(); };
  ws.onerror = () => showError("the WebSocket /ws failed");
}

function socketOpen() {
  return new Promise((resolve, reject) => {
    if (ws && ws.readyState === WebSocket.OPEN) return resolve();
    if (!ws || ws.readyState > WebSocket.OPEN) {  // not yet opened, or closed: (re)open once connected
      if (!pc || pc.connectionState !== "connected") return reject(new Error("wait until the session is connected"));
      openSocket();
    }
    ws.addEventListener("open", () => resolve(), {once: true});
    ws.addEventListener("close", () => reject(new Error("the WebSocket /ws closed")), {once: true});
  });
}

async function setMic(on) {
  if (on === mic.on || mic.mode === "off") return;
  $("mic").disabled = true;
  try {
    if (MIC_MODES[mic.mode].webrtc) {
      mic.track.enabled = on;  // a disabled track sends silence
      mic.on = on;
    } else if (on) {
      await socketOpen();
      if (!mic.ctx) await openMic();
      mic.seq = 0;
      ws.send(JSON.stringify({type: "start", sample_rate: mic.ctx.sampleRate, format: PCM_FORMAT, channels: 1,
                              framing: "crc32", interrupt: $("interrupt").checked}));
      mic.on = true;
    } else {
      mic.on = false;
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "end"}));
      closeMic();  // releases the device while the mic is off
    }
  } catch (e) {
    showError(`microphone: ${e.message || e}`);
  } finally {
    $("mic").disabled = !pc || pc.connectionState !== "connected";
    showMicState();
  }
}

// -- live stats --------------------------------------------------------------------------------------
let previous = {};  // the last getStats() figures, by key

function rate(key, value, ts) {
  // per second since the previous reading of `key` (null on the first)
  const p = previous[key];
  previous[key] = {value, ts};
  return p && ts > p.ts ? (value - p.value) / ((ts - p.ts) / 1000) : null;
}

function windowMean(key, sum, count) {
  // (sum delta) / (count delta): the mean over the last second; the running mean when nothing was emitted
  const p = previous[key];
  previous[key] = {sum, count};
  if (p && count > p.count) return (sum - p.sum) / (count - p.count);
  return count ? sum / count : null;
}

function show(id, value, digits = 0) {
  liveStats[id] = value;
  $(id).textContent = value === null || value === undefined || Number.isNaN(value) ? "\u2013" : Number(value).toFixed(digits);
}

async function pollStats() {
  if (!pc) return;
  let report;
  try { report = await pc.getStats(); } catch (e) { return; }
  let video = null, audio = null, pair = null, transport = null;
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") video = r;
    else if (r.type === "inbound-rtp" && r.kind === "audio") audio = r;
    else if (r.type === "transport") transport = r;
  });
  if (transport && transport.selectedCandidatePairId) pair = report.get(transport.selectedCandidatePairId);
  if (!pair) report.forEach((r) => { if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") pair = r; });
  if (video) {
    show("stat-fps", rate("framesDecoded", video.framesDecoded || 0, video.timestamp), 1);
    show("stat-dropped", video.framesDropped ?? null);
    const jb = windowMean("jbVideo", video.jitterBufferDelay || 0, video.jitterBufferEmittedCount || 0);
    show("stat-jb-video", jb === null ? null : 1000 * jb);
  }
  if (audio) {
    show("stat-audio-packets", audio.packetsReceived ?? null);
    const jb = windowMean("jbAudio", audio.jitterBufferDelay || 0, audio.jitterBufferEmittedCount || 0);
    show("stat-jb-audio", jb === null ? null : 1000 * jb);
  }
  show("stat-rtt", pair && pair.currentRoundTripTime !== undefined ? 1000 * pair.currentRoundTripTime : null, 1);
  liveStats.framesDecoded = video ? video.framesDecoded : 0;
  liveStats.audioPacketsReceived = audio ? audio.packetsReceived : 0;
  if (!sessionid) return;
  const s = await request(`/stats?sessionid=${encodeURIComponent(sessionid)}`);
  if (!sessionid) return;  // stopped meanwhile
  if (s.code !== 0) {
    if (s.http === 404) return sessionGone(`the server no longer has this session (${s.msg})`);
    return;  // a transient failure: the next second tries again
  }
  show("stat-start-latency", s.last_start_latency_ms ?? null);
  show("stat-frames-sent", s.frames_sent ?? null);
  show("stat-frames-late", s.frames_late ?? null);
  show("stat-server-dropped", s.frames_dropped ?? null);
  show("stat-underruns", s.underruns ?? null);
}

// -- session -------------------------------------------------------------------------------------------
function applyMute() { $("audio").muted = $("muteavatar").checked; }

function onModeChange() {
  mic.mode = selectedMode();
  // lipsync: do not hear yourself back by default; converse: the reply must be heard
  // (the mic's echo cancellation keeps it out of the conversation).
  $("muteavatar").checked = mic.mode === "lipsync" || mic.mode === "websocket";
  applyMute();
  if (mic.mode === "converse") document.querySelector('input[name="saymode"][value="chat"]').checked = true;  // typed turns too
  showMicState();
}

function lockSetup(locked) {
  for (const r of document.querySelectorAll('input[name="micmode"]')) r.disabled = locked || (r.value === "converse" && !r.dataset.available);
  $("avatar").disabled = locked;
}

function gathered(peer, timeoutMs) {
  // No trickle ICE: wait for gathering to finish (or time out), then send the whole offer.
  return new Promise((resolve) => {
    if (peer.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, timeoutMs);
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

function onConnectionState() {
  if (!pc) return;
  const state = pc.connectionState;
  if (state === "connected") {
    clearTimeout(connectTimer);
    status(`connected (session ${short(sessionid)})`);
    if (connectedOnce) return;  // back after "disconnected"
    connectedOnce = true;
    // Speech and /ws are refused (409) until the peer has connected: enable them now.
    for (const id of ["say", "hush", "send"]) $(id).disabled = false;
    $("mic").disabled = mic.mode === "off";
    if (mic.mode === "websocket" && !ws) openSocket();
    if (mic.mode === "converse" && !mic.on) setMic(true);
    if (!statsTimer) statsTimer = setInterval(pollStats, STATS_EVERY_MS);
    setTimeout(() => { if (pc && channel.readyState !== "open") openSSE(); }, SSE_FALLBACK_MS);
  } else if (state === "connecting") {
    busy(`connecting (session ${short(sessionid)})\u2026`);
  } else if (state === "disconnected") {
    showError("the connection to the server was interrupted (disconnected); waiting for it to come back\u2026");
  } else if (state === "failed") {
    showError("the connection failed (ICE): no network path to the server; off loopback it needs STUN/TURN (--ice_server)");
    stop(false);
  }
}

function sessionGone(msg) {
  if (!pc || stopping) return;
  showError(msg);
  stop(false);
}

async function start() {
  $("start").disabled = true;
  lockSetup(true);
  try {
    if (!config.loaded) {
      busy("reading the server's configuration\u2026");
      if (!(await loadConfig())) return stop(false);
    }
    mic.mode = selectedMode();
    const how = MIC_MODES[mic.mode];
    if (how.webrtc) {
      busy("opening the microphone\u2026");
      await openMic();
      mic.track.enabled = false;  // silent until "Mic on" (converse: on at once when connected)
    }
    pc = new RTCPeerConnection({iceServers: config.ice_servers || []});
    channel = pc.createDataChannel("events");
    channel.onmessage = (ev) => parseEvent(ev.data, "datachannel");
    channel.onclose = () => { if (pc && !stopping && pc.connectionState === "connected") sessionGone("the server ended the session"); };
    pc.addTransceiver("video", {direction: "recvonly"});
    if (how.webrtc) pc.addTransceiver(mic.track, {direction: "sendrecv", streams: [mic.stream]});
    else pc.addTransceiver("audio", {direction: "recvonly"});
    pc.ontrack = (ev) => { (ev.track.kind === "video" ? $("video") : $("audio")).srcObject = ev.streams[0] || new MediaStream([ev.track]); };
    pc.onconnectionstatechange = onConnectionState;
    busy("gathering network candidates\u2026");
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, ICE_GATHER_TIMEOUT_MS);
    if (!pc) return;  // stopped meanwhile
    const offer = {sdp: pc.localDescription.sdp, type: pc.localDescription.type};
    if (how.offer) offer.mic = how.offer;
    if ($("avatar").value) offer.avatar = $("avatar").value;
    if ($("voice").value) offer.voice = $("voice").value;
    busy("sending the offer\u2026");
    const answer = await post("/offer", offer);
    if (!pc) return;
    if (answer.code !== 0) {
      if (answer.http === 401) $("keybox").open = true;
      showError(`the server refused the session: ${answer.msg}${answer.http ? ` (HTTP ${answer.http})` : ""}`);
      return stop(false);
    }
    sessionid = answer.sessionid;
    token = answer.token || null;
    busy(`connecting (session ${short(sessionid)})\u2026`);
    connectTimer = setTimeout(() => {
      if (pc && pc.connectionState !== "connected") {
        showError(`no connection within ${CONNECT_TIMEOUT_MS / 1000} s (state ${pc.connectionState}): ` +
                  "the media path to the server is blocked; off loopback it needs STUN/TURN (--ice_server)");
        stop(false);
      }
    }, CONNECT_TIMEOUT_MS);
    await pc.setRemoteDescription({sdp: answer.sdp, type: answer.type});
    $("stop").disabled = false;
    showMicState();
  } catch (e) {
    showError(`could not start: ${e.message || e}`);
    stop(false);
  }
}

function stop(clearStatus = true) {
  stopping = true;
  if (mic.on && mic.mode === "websocket" && ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "end"}));
  mic.on = false; mic.sent = mic.dropped = 0;
  closeMic();
  clearTimeout(connectTimer); clearInterval(statsTimer);
  connectTimer = statsTimer = null;
  if (ws) { ws.onclose = null; ws.close(); }
  if (sse) sse.close();
  if (pc) pc.close();
  pc = sessionid = token = channel = ws = sse = null;
  previous = {};
  connectedOnce = false;
  avatarLines.clear(); failedUtterances.clear();  // utterance numbers start again at 1 in the next session
  if (clearStatus) status("not connected");
  $("start").disabled = false;
  lockSetup(false);
  for (const id of ["stop", "say", "hush", "send", "mic"]) $(id).disabled = true;
  $("speaking").textContent = "idle"; $("speaking").classList.remove("speaking");
  $("subtitle").textContent = "";
  showMicState();
  stopping = false;
}

function queued(j, what) {
  if (failedUtterances.has(j.utterance)) return;  // its error event came first (an LLM that fails at once)
  status(`${what}: utterance ${j.utterance} queued (session ${short(sessionid)})`);
}

async function send() {
  const text = $("text").value.trim();
  if (!text) return status("type something first");
  const type = sayMode();
  const body = {sessionid, text, type, interrupt: $("interrupt").checked};
  if ($("voice").value) body.voice = $("voice").value;
  if (type === "chat") logLine("user", "you", text);
  const j = await post("/human", body);
  if (j.code !== 0) return sessionCallFailed(j, type === "chat" ? "chat" : "speech");
  queued(j, type);
  if (type === "chat") $("text").value = "";
}

async function sendFile() {
  const f = $("file").files[0];
  if (!f) return status("choose an audio file first");
  const form = new FormData();
  form.append("sessionid", sessionid);
  form.append("interrupt", $("interrupt").checked ? "true" : "false");
  form.append("file", f);
  busy(`uploading ${f.name}\u2026`);
  const j = await request("/humanaudio", {method: "POST", body: form}, UPLOAD_TIMEOUT_MS);
  if (j.code !== 0) return sessionCallFailed(j, `audio file ${f.name}`);
  queued(j, "audio file");
  logLine("system", "", `audio file ${f.name} (${j.duration_s} s) is utterance ${j.utterance}`);
}

async function interrupt() {
  const j = await post("/interrupt_talk", {sessionid});
  if (j.code !== 0) sessionCallFailed(j, "interrupt");
}

for (const r of document.querySelectorAll('input[name="micmode"]')) r.onchange = onModeChange;
$("muteavatar").onchange = applyMute;
$("start").onclick = start;
$("stop").onclick = () => stop();
$("mic").onclick = () => setMic(!mic.on);
$("say").onclick = send;
$("text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !$("say").disabled) { ev.preventDefault(); send(); }
});
$("hush").onclick = interrupt;
$("send").onclick = sendFile;
$("apikey").addEventListener("change", () => { if (!pc) loadConfig(); });
window.addEventListener("pagehide", () => pc && stop());  // closing the tab ends the session at once
onModeChange();
loadConfig();
