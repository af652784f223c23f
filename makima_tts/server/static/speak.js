// makima-tts /speak page: stream speech over /api/v1/speak and play it through an AudioWorklet.
//
// Audio: the page opens an AudioContext at 24 kHz (the model's own rate) and asks the server for
// pcm_f32le at 24000, so nothing is resampled on the server and the browser converts to the
// device rate. If the browser refuses a 24 kHz context it uses its default rate and asks the
// server for that rate when the server supports it. If the server answers with another rate
// than the context's, the context is re-created at the server's rate.
//
// Counters for tests live on window.makima (see `M` below).
(() => {
  "use strict";

  const SERVER_RATES = [8000, 16000, 22050, 24000, 44100, 48000];
  const LANGUAGES = ["auto", "chinese", "english", "japanese", "korean", "german", "french",
                     "russian", "portuguese", "spanish", "italian"];
  const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

  const params = new URLSearchParams(location.search);
  const apiKey = params.get("api_key") || "";

  // ------------------------------------------------------------------ state for tests and UI
  const M = {
    state: "connecting",
    stateDetail: "",
    ready: null,              // the server's ready message
    sampleRate: 0,            // PCM rate of the session
    format: "pcm_f32le",
    contextRate: 0,
    contextState: "",         // the AudioContext's state: suspended until the browser allows audio
    connects: 0,
    reconnects: 0,
    bytesReceived: 0,
    binaryMessages: 0,
    framesToWorklet: 0,       // PCM frames (samples) posted to the worklet
    chunksToWorklet: 0,
    workletFramesReceived: 0, // reported back by the worklet
    workletChunksReceived: 0,
    workletFramesPlayed: 0,
    workletBuffered: 0,
    workletPlaying: false,
    underruns: 0,
    flushes: 0,
    utterances: 0,            // audio_end received
    cancelledMessages: 0,
    lastCancelled: null,      // ids of the last `cancelled`
    stopsSent: 0,
    lastError: null,          // {code, message, source}
    errors: 0,
    lastMetrics: null,        // {id, ttfa_ms, rtf, audio_ms, client_ttfa_ms}
    lastUtteranceFrames: 0,
    voices: [],
    messages: [],             // last server JSON messages (types only and ids)
  };
  window.makima = M;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), statusText: $("status-text"),
    error: $("error"), errorText: $("error-text"), errorClose: $("error-close"),
    speakForm: $("speak-form"), text: $("text"), voice: $("voice"), language: $("language"),
    speak: $("speak"), stop: $("stop"), download: $("download"),
    mTtfa: $("m-ttfa"), mCttfa: $("m-cttfa"), mRtf: $("m-rtf"), mAudio: $("m-audio"), engine: $("engine"),
    cloneForm: $("clone-form"), clip: $("clip"), record: $("record"), recStatus: $("rec-status"),
    preview: $("preview"), transcript: $("transcript"), cloneName: $("clone-name"),
    cloneLanguage: $("clone-language"), cloneId: $("clone-id"), xvec: $("xvec"),
    upload: $("upload"), uploadStatus: $("upload-status"),
  };

  // ------------------------------------------------------------------ helpers
  function apiUrl(path) { return new URL(path, location.href).toString(); }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (apiKey) h.Authorization = "Bearer " + apiKey;
    return h;
  }

  async function httpError(resp) {
    let code = "HTTP_" + resp.status, message = resp.statusText || ("HTTP " + resp.status);
    try {
      const body = await resp.json();
      const e = body && (body.error || body.detail);
      if (e && typeof e === "object") {
        message = e.message || message;
        code = e.code || code;
      } else if (typeof e === "string") {
        message = e;
      }
    } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.code = code;
    err.status = resp.status;
    return err;
  }

  function showError(code, message, source) {
    M.lastError = { code: code || null, message: message, source: source || "page" };
    M.errors += 1;
    ui.errorText.textContent = "";
    if (code) {
      const tag = document.createElement("strong");
      tag.className = "code";
      tag.textContent = code;
      ui.errorText.append(tag, " ");
    }
    ui.errorText.append(message);
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.errorText.textContent = "";
  }

  const STATE_TEXT = {
    connecting: "connecting", loading: "model loading", ready: "ready",
    speaking: "speaking", error: "error",
  };

  function setState(state, detail) {
    M.state = state;
    M.stateDetail = detail || "";
    ui.status.dataset.state = state;
    ui.statusText.textContent = STATE_TEXT[state] + (detail ? " · " + detail : "");
    const connected = ws && ws.readyState === WebSocket.OPEN && M.ready;
    ui.speak.disabled = !connected;
    ui.stop.disabled = state !== "speaking";
  }

  function fillLanguages(select, value) {
    for (const lang of LANGUAGES) {
      const o = document.createElement("option");
      o.value = lang;
      o.textContent = lang === "auto" ? "auto-detect" : lang[0].toUpperCase() + lang.slice(1);
      select.appendChild(o);
    }
    select.value = value;
  }

  // ------------------------------------------------------------------ audio output
  let ctx = null, node = null, audioReady = null;

  function createContext(rate) {
    const AC = window.AudioContext || window.webkitAudioContext;
    if (rate) {
      try { return new AC({ sampleRate: rate, latencyHint: "interactive" }); } catch (_) { /* below */ }
    }
    return new AC({ latencyHint: "interactive" });
  }

  function setupAudio(rate) {
    audioReady = (async () => {
      if (ctx) { try { await ctx.close(); } catch (_) { /* closed */ } }
      ctx = createContext(rate);
      M.contextRate = ctx.sampleRate;
      M.contextState = ctx.state;
      ctx.onstatechange = () => { M.contextState = ctx.state; };
      await ctx.audioWorklet.addModule(apiUrl("static/pcm-worklet.js"));
      node = new AudioWorkletNode(ctx, "makima-pcm-player", {
        numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: {
          prebufferFrames: Math.round(ctx.sampleRate * 0.05),
          rebufferFrames: Math.round(ctx.sampleRate * 0.12),
        },
      });
      node.port.onmessage = (e) => onWorkletMessage(e.data);
      node.connect(ctx.destination);
      M.workletFramesReceived = M.workletChunksReceived = M.workletFramesPlayed = 0;
      return ctx;
    })();
    audioReady.catch((e) => showError("AUDIO", "Audio output is not available: " + e.message, "audio"));
    return audioReady;
  }

  function withTimeout(promise, ms) {
    return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error("timeout")), ms))]);
  }

  function requestedRate() {
    const r = ctx ? ctx.sampleRate : 24000;
    return SERVER_RATES.includes(r) ? r : 24000;
  }

  function onWorkletMessage(msg) {
    if (msg.type === "stats") {
      M.workletFramesReceived = msg.framesReceived;
      M.workletChunksReceived = msg.chunksReceived;
      M.workletFramesPlayed = msg.framesPlayed;
      M.underruns = msg.underruns;
      M.flushes = msg.flushes;
      M.workletBuffered = msg.buffered;
      M.workletPlaying = msg.playing;
    } else if (msg.type === "started") {
      if (current && current.playStartAt == null) current.playStartAt = performance.now();
    } else if (msg.type === "drained") {
      playing = false;
      maybeIdle();
    }
  }

  function postPcm(samples) {
    if (!node) return;
    const n = samples.length;       // the buffer is transferred: count before posting
    node.port.postMessage({ type: "pcm", samples }, [samples.buffer]);
    M.framesToWorklet += n;
    M.chunksToWorklet += 1;
  }

  function flushPlayer() {
    playing = false;
    if (node) node.port.postMessage({ type: "flush" });
  }

  // ------------------------------------------------------------------ socket
  let ws = null, attempt = 0, reconnectTimer = null, readyPoll = null;
  let readies = 0;                    // ready messages on this socket (on connect, then the answer to start)
  let nextId = 1;
  const pending = new Map();          // id -> {sentAt}
  const dropped = new Set();          // ids cancelled locally: their audio is dropped
  let current = null;                 // utterance whose audio is arriving {id, sentAt, ...}
  let receivingId = null;
  let playing = false;
  let leftover = null;                // bytes of a split sample
  let lastPcm = { rate: 24000, chunks: [], frames: 0 };

  async function checkReady() {
    try {
      const r = await fetch(apiUrl("ready"), { headers: authHeaders(), cache: "no-store" });
      if (r.ok) return { ready: true };
      let reason = "";
      try { const b = await r.json(); reason = b.reason || (b.error && b.error.message) || ""; } catch (_) { /* */ }
      return { ready: false, reason, status: r.status };
    } catch (e) {
      return { ready: false, reason: "server unreachable", down: true };
    }
  }

  async function start() {
    clearTimeout(reconnectTimer);
    clearTimeout(readyPoll);
    setState("connecting", attempt ? "retry " + attempt : "");
    const r = await checkReady();
    if (!r.ready && !r.down && r.status === 503) {
      setState("loading", r.reason || "");
      readyPoll = setTimeout(start, 1000);
      return;
    }
    if (r.down) { scheduleReconnect(); return; }
    connect();
  }

  function connect() {
    const u = new URL("api/v1/speak", location.href);
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (apiKey) u.searchParams.set("api_key", apiKey);
    u.hash = "";
    let sock;
    try { sock = new WebSocket(u.toString()); } catch (e) { scheduleReconnect(); return; }
    ws = sock;
    readies = 0;
    sock.binaryType = "arraybuffer";
    M.connects += 1;
    sock.onopen = async () => {
      if (audioReady) { try { await audioReady; } catch (_) { /* shown */ } }
      if (sock !== ws || sock.readyState !== WebSocket.OPEN) return;
      sock.send(JSON.stringify({ type: "start", format: "pcm_f32le", sample_rate: requestedRate() }));
    };
    sock.onmessage = (e) => {
      if (sock !== ws) return;
      if (typeof e.data === "string") onJson(e.data);
      else onBinary(e.data);
    };
    sock.onclose = (e) => {
      if (sock !== ws) return;
      ws = null;
      M.ready = null;
      const lost = pending.size > 0 || playing;
      for (const id of pending.keys()) dropped.add(id);
      pending.clear();
      current = null;
      receivingId = null;
      if (lost) flushPlayer();
      if (e.code === 4401 || e.code === 1008) {
        showError("UNAUTHORIZED", "The server refused the API key. Open this page as /speak?api_key=YOUR_KEY.", "socket");
      } else if (e.code === 1011) {
        showError("TTS_UNAVAILABLE", "The server has no speech engine: " + (e.reason || "see its log"), "socket");
      }
      scheduleReconnect();
    };
    sock.onerror = () => { /* onclose follows */ };
  }

  function scheduleReconnect() {
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
    attempt += 1;
    M.reconnects += 1;
    setState("connecting", `reconnecting in ${(delay / 1000).toFixed(delay < 1000 ? 1 : 0)} s`);
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(start, delay);
  }

  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  function logMessage(msg) {
    M.messages.push({ type: msg.type, id: msg.id, code: msg.code, ids: msg.ids, t: Math.round(performance.now()) });
    if (M.messages.length > 100) M.messages.shift();
  }

  function onJson(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (_) { return; }
    logMessage(msg);
    switch (msg.type) {
      case "ready": onReady(msg); break;
      case "audio_start": onAudioStart(msg); break;
      case "audio_end": onAudioEnd(msg); break;
      case "cancelled":
        M.cancelledMessages += 1;
        M.lastCancelled = msg.ids || [];
        for (const id of (msg.ids || [])) { pending.delete(id); dropped.add(id); }
        maybeIdle();
        break;
      case "status":
        if (msg.state === "loading") setState("loading", msg.message || "");
        break;
      case "stopped": break;
      case "error": onServerError(msg); break;
    }
  }

  async function onReady(msg) {
    M.ready = msg;
    readies += 1;
    M.sampleRate = msg.sample_rate || requestedRate();
    M.format = msg.format || "pcm_f32le";
    attempt = 0;
    // the first ready (on connect) carries the server's defaults; the answer to `start` is ours
    const answer = readies >= 2 || (msg.format === "pcm_f32le" && msg.sample_rate === requestedRate());
    if (ctx && answer && M.sampleRate !== ctx.sampleRate) {
      // the server gave another rate than asked: play at its rate, the browser resamples
      await setupAudio(M.sampleRate);
    }
    // a local checkpoint folder: show its name, the full path on hover
    const model = msg.model && /^([A-Za-z]:)?[\\/]/.test(msg.model)
      ? msg.model.replace(/[\\/]+$/, "").split(/[\\/]/).pop() : msg.model;
    ui.engine.title = msg.model || "";
    const parts = [msg.engine, model].filter(Boolean);
    ui.engine.textContent = (parts.length ? "Engine: " + parts.join(" · ") + " · " : "") +
      `${M.sampleRate} Hz ${M.format}` + (msg.session_id ? ` · session ${String(msg.session_id).slice(0, 8)}` : "");
    setState(pending.size || playing ? "speaking" : "ready");
  }

  function onAudioStart(msg) {
    receivingId = msg.id;
    leftover = null;
    if (dropped.has(msg.id)) return;
    const p = pending.get(msg.id) || { sentAt: performance.now() };
    current = { id: msg.id, sentAt: p.sentAt, firstAudioAt: null, playStartAt: null };
    lastPcm = { rate: M.sampleRate || 24000, chunks: [], frames: 0 };
    ui.download.disabled = true;
  }

  function onBinary(buf) {
    M.bytesReceived += buf.byteLength;
    M.binaryMessages += 1;
    if (receivingId == null || dropped.has(receivingId)) return;
    let bytes = new Uint8Array(buf);
    if (leftover) {
      const joined = new Uint8Array(leftover.length + bytes.length);
      joined.set(leftover);
      joined.set(bytes, leftover.length);
      bytes = joined;
      leftover = null;
    }
    const width = M.format === "pcm_s16le" ? 2 : 4;
    const usable = bytes.length - (bytes.length % width);
    if (usable < bytes.length) leftover = bytes.slice(usable);
    if (!usable) return;
    const aligned = bytes.byteOffset % width === 0 ? bytes : bytes.slice(0, usable);
    let samples;
    if (width === 4) {
      samples = new Float32Array(aligned.buffer, aligned.byteOffset, usable / 4).slice();
    } else {
      const ints = new Int16Array(aligned.buffer, aligned.byteOffset, usable / 2);
      samples = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) samples[i] = ints[i] / 32768;
    }
    if (current && current.firstAudioAt == null) {
      current.firstAudioAt = performance.now();
      ui.mCttfa.textContent = Math.round(current.firstAudioAt - current.sentAt) + " ms";
    }
    lastPcm.chunks.push(samples.slice());
    lastPcm.frames += samples.length;
    M.lastUtteranceFrames = lastPcm.frames;
    playing = true;
    postPcm(samples);
    if (M.state !== "speaking") setState("speaking");
  }

  function onAudioEnd(msg) {
    const mine = current && current.id === msg.id;
    if (receivingId === msg.id) receivingId = null;
    pending.delete(msg.id);
    if (dropped.has(msg.id)) { maybeIdle(); return; }
    M.utterances += 1;
    const clientTtfa = mine && current.firstAudioAt != null ? current.firstAudioAt - current.sentAt : null;
    M.lastMetrics = {
      id: msg.id, ttfa_ms: msg.ttfa_ms, rtf: msg.rtf, audio_ms: msg.audio_ms,
      client_ttfa_ms: clientTtfa == null ? null : Math.round(clientTtfa),
    };
    ui.mTtfa.textContent = msg.ttfa_ms != null ? Math.round(msg.ttfa_ms) + " ms" : "–";
    ui.mRtf.textContent = msg.rtf != null ? Number(msg.rtf).toFixed(2) : "–";
    ui.mAudio.textContent = msg.audio_ms != null ? (msg.audio_ms / 1000).toFixed(2) + " s" : "–";
    if (clientTtfa != null) ui.mCttfa.textContent = Math.round(clientTtfa) + " ms";
    ui.download.disabled = lastPcm.frames === 0;
    if (node) node.port.postMessage({ type: "end" });
    if (!lastPcm.frames) playing = false;
    maybeIdle();
  }

  function onServerError(msg) {
    if (msg.code === "SESSION_TIMEOUT") return;     // idle: the socket closes and we reconnect
    showError(msg.code, msg.message || "error", "socket");
    if (msg.id != null) {
      pending.delete(msg.id);
      if (current && current.id === msg.id && node) node.port.postMessage({ type: "end" });
    }
    if (msg.code === "TTS_NOT_READY") {
      setState("loading", "");
      readyPoll = setTimeout(async () => {
        const r = await checkReady();
        if (r.ready) setState(pending.size || playing ? "speaking" : "ready");
      }, 1000);
      return;
    }
    if (msg.recoverable === false) { setState("error", ""); return; }
    maybeIdle();
  }

  function maybeIdle() {
    if (!ws || !M.ready) return;
    if (pending.size === 0 && !playing && M.state !== "loading") setState("ready");
  }

  // ------------------------------------------------------------------ speak / stop
  async function speak() {
    const text = ui.text.value.trim();
    if (!text) {
      showError("EMPTY_TEXT", "Type some text to speak first.", "page");
      ui.text.focus();
      return;
    }
    if (!ws || ws.readyState !== WebSocket.OPEN || !M.ready) {
      showError("NOT_CONNECTED", "Not connected to the server yet; wait for “ready”.", "page");
      return;
    }
    clearError();
    if (audioReady) { try { await withTimeout(audioReady, 3000); } catch (_) { /* shown by setupAudio */ } }
    // resume() waits for the browser to allow audio (autoplay rules, no output device): never block on it
    if (ctx && ctx.state !== "running") { try { await withTimeout(ctx.resume(), 500); } catch (_) { /* later */ } }
    // interrupt: the server cancels what it is saying; drop its audio here at once
    for (const id of pending.keys()) dropped.add(id);
    pending.clear();
    flushPlayer();
    const id = "u" + nextId++;
    const msg = { type: "speak", id, text, interrupt: true };
    if (ui.voice.value) msg.voice = ui.voice.value;
    msg.language = ui.language.value || "auto";
    pending.set(id, { sentAt: performance.now() });
    for (const cell of [ui.mTtfa, ui.mCttfa, ui.mRtf, ui.mAudio]) cell.textContent = "…";
    if (!send(msg)) { pending.delete(id); return; }
    setState("speaking");
  }

  function stop() {
    if (pending.size || receivingId != null) {
      for (const cell of [ui.mTtfa, ui.mRtf, ui.mAudio]) if (cell.textContent === "…") cell.textContent = "–";
    }
    for (const id of pending.keys()) dropped.add(id);
    if (receivingId != null) dropped.add(receivingId);
    pending.clear();
    flushPlayer();
    if (send({ type: "cancel" })) M.stopsSent += 1;
    setState(ws && M.ready ? "ready" : M.state);
  }

  // ------------------------------------------------------------------ WAV download
  function wavBlob(chunks, frames, rate) {
    const buf = new ArrayBuffer(44 + frames * 2);
    const v = new DataView(buf);
    const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + frames * 2, true); str(8, "WAVE");
    str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    str(36, "data"); v.setUint32(40, frames * 2, true);
    let o = 44;
    for (const c of chunks) {
      for (let i = 0; i < c.length; i++, o += 2) {
        const s = Math.max(-1, Math.min(1, c[i]));
        v.setInt16(o, s < 0 ? Math.round(s * 32768) : Math.round(s * 32767), true);
      }
    }
    return new Blob([buf], { type: "audio/wav" });
  }

  function download() {
    if (!lastPcm.frames) return;
    const blob = wavBlob(lastPcm.chunks, lastPcm.frames, lastPcm.rate);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    const voice = (ui.voice.value || "voice").replace(/[^A-Za-z0-9_.-]+/g, "_");
    a.download = `makima-${voice}-${new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19)}.wav`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }
  M.lastWav = () => (lastPcm.frames ? wavBlob(lastPcm.chunks, lastPcm.frames, lastPcm.rate) : null);

  // ------------------------------------------------------------------ voices
  function voiceLabel(v) {
    const name = v.name || v.voice_id;
    const bits = [];
    if (v.language && v.language !== "auto") bits.push(v.language);
    if (v.builtin) bits.push("built-in");
    else if (v.generated) bits.push("generated");
    else if (v.seed) bits.push("seed");
    else bits.push("cloned");
    return bits.length ? `${name} (${bits.join(", ")})` : name;
  }

  function selectVoice(id) {
    if ([...ui.voice.options].some((o) => o.value === id && !o.disabled)) ui.voice.value = id;
  }

  function option(value, text, disabled) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    o.disabled = !!disabled;
    return o;
  }

  async function loadVoices(select) {
    try {
      const r = await fetch(apiUrl("api/v1/voices?limit=1000"), { headers: authHeaders(), cache: "no-store" });
      if (!r.ok) throw await httpError(r);
      const body = await r.json();
      const voices = body.voices || [];
      M.voices = voices;
      // default_voice: a voice id, or {voice_id, reason}
      const dv = body.default_voice;
      const defaultId = dv && typeof dv === "object" ? dv.voice_id : dv || "";
      const keep = select != null ? select : ui.voice.value;
      ui.voice.textContent = "";
      const listed = voices.some((v) => v.voice_id === defaultId);
      ui.voice.appendChild(option("", "Server default" + (defaultId && !listed ? ` (${defaultId})` : "")));
      for (const v of voices) {
        const noClip = v.has_audio === false && !v.builtin && !v.generated;
        ui.voice.appendChild(option(v.voice_id,
          voiceLabel(v) + (v.voice_id === defaultId ? " · default" : "") + (noClip ? " · no clip yet" : ""),
          noClip));
      }
      selectVoice(keep || "");
      return voices;
    } catch (e) {
      if (!ui.voice.options.length || ui.voice.options[0].value !== "") {
        ui.voice.textContent = "";
        ui.voice.appendChild(option("", "Server default"));
      }
      showError(e.code || "VOICES", "Could not load voices: " + e.message, "http");
      setTimeout(() => loadVoices(), 5000);
      return [];
    }
  }

  // ------------------------------------------------------------------ cloning
  let recorder = null, recorded = null, recChunks = [], recStarted = 0, recTimer = null;

  function recordingExt(type) {
    if (/webm/.test(type)) return "webm";
    if (/ogg/.test(type)) return "ogg";
    if (/mp4|aac|m4a/.test(type)) return "m4a";
    if (/wav/.test(type)) return "wav";
    return "webm";
  }

  async function toggleRecord() {
    if (recorder && recorder.state === "recording") { recorder.stop(); return; }
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      showError("NO_RECORDER", "Recording is not available in this browser (it needs HTTPS or localhost).", "page");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    } catch (e) {
      showError("MIC", "The microphone is not available: " + e.message, "page");
      return;
    }
    const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
    const mimeType = types.find((t) => MediaRecorder.isTypeSupported && MediaRecorder.isTypeSupported(t));
    recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    recChunks = [];
    recorder.ondataavailable = (e) => { if (e.data && e.data.size) recChunks.push(e.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      clearInterval(recTimer);
      const type = recorder.mimeType || mimeType || "audio/webm";
      recorded = new File(recChunks, "recording." + recordingExt(type), { type });
      const secs = ((performance.now() - recStarted) / 1000).toFixed(1);
      ui.recStatus.textContent = `Recorded ${secs} s. It will be uploaded instead of a file.`;
      ui.preview.src = URL.createObjectURL(recorded);
      ui.preview.hidden = false;
      ui.record.textContent = "● Record again";
      ui.record.classList.remove("recording");
      ui.record.setAttribute("aria-pressed", "false");
      ui.clip.value = "";
    };
    recorder.start(250);
    recStarted = performance.now();
    ui.record.textContent = "■ Stop recording";
    ui.record.classList.add("recording");
    ui.record.setAttribute("aria-pressed", "true");
    recTimer = setInterval(() => {
      ui.recStatus.textContent = `Recording… ${((performance.now() - recStarted) / 1000).toFixed(1)} s (aim for 3–10 s)`;
    }, 200);
  }

  async function uploadVoice() {
    const file = (ui.clip.files && ui.clip.files[0]) || recorded;
    ui.uploadStatus.textContent = "";
    ui.uploadStatus.className = "hint";
    if (!file) {
      showError("NO_AUDIO", "Choose an audio clip or record one first.", "page");
      ui.clip.focus();
      return;
    }
    const xvec = ui.xvec.checked;
    const transcript = ui.transcript.value.trim();
    if (!xvec && !transcript) {
      showError("NO_TRANSCRIPT", "Type what the clip says (or tick “Speaker embedding only” under Options).", "page");
      ui.transcript.focus();
      return;
    }
    const name = ui.cloneName.value.trim() || (file.name || "voice").replace(/\.[^.]+$/, "");
    const fd = new FormData();
    fd.append("file", file, file.name || "clip.wav");
    fd.append("name", name);
    fd.append("transcript", transcript);
    fd.append("language", ui.cloneLanguage.value || "auto");
    if (ui.cloneId.value.trim()) fd.append("voice_id", ui.cloneId.value.trim());
    fd.append("x_vector_only", xvec ? "true" : "false");
    ui.upload.disabled = true;
    ui.uploadStatus.textContent = "Uploading…";
    try {
      const r = await fetch(apiUrl("api/v1/voices"), { method: "POST", body: fd, headers: authHeaders() });
      if (!r.ok) throw await httpError(r);
      const body = await r.json().catch(() => ({}));
      const v = (body && (body.voice || body)) || {};
      const id = v.voice_id || v.id;
      await loadVoices(id);
      if (id) selectVoice(id);
      clearError();
      ui.uploadStatus.textContent = `Added “${v.name || name}”${id ? " (" + id + ")" : ""}; it is selected above.` +
        (v.warning ? " Note: " + v.warning : "");
      ui.uploadStatus.className = "hint ok";
      M.lastUpload = v;
    } catch (e) {
      ui.uploadStatus.textContent = "Upload failed.";
      ui.uploadStatus.className = "hint bad";
      showError(e.code, e.message || "upload failed", "http");
    } finally {
      ui.upload.disabled = false;
    }
  }

  // ------------------------------------------------------------------ wiring
  fillLanguages(ui.language, "auto");
  fillLanguages(ui.cloneLanguage, "auto");
  ui.speakForm.addEventListener("submit", (e) => { e.preventDefault(); speak(); });
  ui.stop.addEventListener("click", stop);
  ui.download.addEventListener("click", download);
  ui.errorClose.addEventListener("click", clearError);
  ui.cloneForm.addEventListener("submit", (e) => { e.preventDefault(); uploadVoice(); });
  ui.record.addEventListener("click", toggleRecord);
  ui.clip.addEventListener("change", () => {
    if (ui.clip.files && ui.clip.files[0]) {
      recorded = null;
      ui.recStatus.textContent = "";
      ui.preview.src = URL.createObjectURL(ui.clip.files[0]);
      ui.preview.hidden = false;
      if (!ui.cloneName.value.trim()) ui.cloneName.value = ui.clip.files[0].name.replace(/\.[^.]+$/, "");
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      if (ui.cloneForm.contains(document.activeElement)) return;
      e.preventDefault();
      speak();
    } else if (e.key === "Escape" && M.state === "speaking") {
      e.preventDefault();
      stop();
    }
  });
  // a user gesture anywhere lets the AudioContext start (autoplay policies)
  const unlock = () => { if (ctx && ctx.state === "suspended") ctx.resume().catch(() => {}); };
  document.addEventListener("pointerdown", unlock, { capture: true });
  document.addEventListener("keydown", unlock, { capture: true });

  M.speak = (text) => { if (text != null) ui.text.value = text; return speak(); };
  M.stop = stop;
  M.reloadVoices = () => loadVoices();
  M.dropConnection = () => { if (ws) ws.close(); };   // for tests: the socket drops, the page reconnects

  setState("connecting");
  setupAudio(24000);
  loadVoices();
  start();
})();
