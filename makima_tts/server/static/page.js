// makima-tts /speak page: wires the DOM to the protocol client (client.js), the audio player
// (player.js, through the AudioWorklet in pcm-worklet.js) and the voice library (voices.js).
// ES modules, no build step: speak.html loads this file with <script type="module">.
//
// What the server knows comes from the server: the languages in the pickers, the sample rates the
// page may ask for and the longest text are those of its `ready` message (docs/protocol.md).
//
// Counters for tests live on window.makima (`M` below; the client and the player add theirs).

import { SpeakClient, checkReady } from "./client.js";
import { Player, wavBlob } from "./player.js";
import { ClipRecorder, addVoice, fillVoices, listVoices, option, selectVoice } from "./voices.js";

const params = new URLSearchParams(location.search);
const apiKey = params.get("api_key") || "";

// ------------------------------------------------------------------ state for tests and UI
const M = {
  state: "connecting",
  stateDetail: "",
  ready: null,              // the server's ready message (the answer to the page's `start`)
  sampleRate: 0,            // PCM rate of the session
  format: "pcm_f32le",
  languages: [],            // from the server's ready
  stopsSent: 0,
  lastError: null,          // {code, message, source}
  errors: 0,
  utterances: 0,            // audio_end received
  lastMetrics: null,        // {id, ttfa_ms, rtf, audio_ms, client_ttfa_ms}
  lastUtteranceFrames: 0,
  voices: [],
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

// ------------------------------------------------------------------ status and errors
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
  ui.speak.disabled = !client.connected;
  ui.stop.disabled = state !== "speaking";
}

function maybeIdle() {
  if (!client.ws || !M.ready) return;
  if (!client.busy && !playing && M.state !== "loading") setState("ready");
}

// ------------------------------------------------------------------ what the server accepts
function languageLabel(lang) {
  return lang === "auto" ? "auto-detect" : lang[0].toUpperCase() + lang.slice(1);
}

function fillLanguages(select, languages) {
  const keep = select.value || "auto";
  select.textContent = "";
  for (const lang of languages) select.appendChild(option(lang, languageLabel(lang)));
  select.value = languages.includes(keep) ? keep : languages[0];
}

/** The languages and the text limit of a `ready` message (sent on connect and after `start`). */
function applyServerInfo(msg) {
  const langs = Array.isArray(msg.languages) && msg.languages.length ? msg.languages.map(String) : ["auto"];
  if (langs.join() !== M.languages.join()) {
    M.languages = langs;
    fillLanguages(ui.language, langs);
    fillLanguages(ui.cloneLanguage, langs);
  }
  if (Number.isInteger(msg.max_text_chars) && msg.max_text_chars > 0) ui.text.maxLength = msg.max_text_chars;
}

// ------------------------------------------------------------------ audio
let playing = false;                // audio handed to the player and not yet played out
let current = null;                 // utterance whose audio is arriving {id, sentAt, firstAudioAt, playStartAt}
let lastPcm = { rate: 0, chunks: [], frames: 0 };

const player = new Player({
  stats: M,
  hooks: {
    onStarted: () => { if (current && current.playStartAt == null) current.playStartAt = performance.now(); },
    onDrained: () => { playing = false; maybeIdle(); },
    onError: (e) => showError("AUDIO", "Audio output is not available: " + e.message, "audio"),
  },
});

function flushPlayer() {
  playing = false;
  player.flush();
}

// ------------------------------------------------------------------ the socket
let notReadyPoll = null;

const client = new SpeakClient({
  apiKey,
  format: "pcm_f32le",
  stats: M,
  hooks: {
    onState: (state, detail) => setState(state, detail),
    onStatus: (msg) => { if (msg.state === "loading") setState("loading", msg.message || ""); },
    // on connect: an AudioContext at the server's default rate, or the one the page has when the
    // server offers its rate; `start` asks for that rate
    onHello: async (hello) => {
      applyServerInfo(hello);
      const rates = Array.isArray(hello.sample_rates) ? hello.sample_rates : [hello.sample_rate];
      await player.ensure(hello.sample_rate, rates);
      return rates.includes(player.rate) ? player.rate : hello.sample_rate;
    },
    onReady,
    onAudioStart,
    onAudio,
    onAudioEnd,
    onCancelled: () => maybeIdle(),
    onError: onServerError,
    onClose: (e, lost) => {
      M.ready = null;
      current = null;
      if (lost || playing) flushPlayer();
      if (e.code === 4401 || e.code === 1008) {
        showError("UNAUTHORIZED", "The server refused the API key. Open this page as /speak?api_key=YOUR_KEY.", "socket");
      } else if (e.code === 1011) {
        showError("TTS_UNAVAILABLE", "The server has no speech engine: " + (e.reason || "see its log"), "socket");
      }
    },
  },
});

async function onReady(msg) {
  M.ready = msg;
  M.sampleRate = msg.sample_rate;
  M.format = msg.format || "pcm_f32le";
  applyServerInfo(msg);
  if (player.ctx && M.sampleRate !== player.rate) {
    // the server gave another rate than asked: play at its rate, the browser resamples
    try { await player.setup(M.sampleRate); } catch (_) { /* shown by the player */ }
  }
  // a local checkpoint folder: show its name, the full path on hover
  const model = msg.model && /^([A-Za-z]:)?[\\/]/.test(msg.model)
    ? msg.model.replace(/[\\/]+$/, "").split(/[\\/]/).pop() : msg.model;
  ui.engine.title = msg.model || "";
  const parts = [msg.engine, model].filter(Boolean);
  ui.engine.textContent = (parts.length ? "Engine: " + parts.join(" · ") + " · " : "") +
    `${M.sampleRate} Hz ${M.format}` + (msg.session_id ? ` · session ${String(msg.session_id).slice(0, 8)}` : "");
  setState(client.busy || playing ? "speaking" : "ready");
}

function onAudioStart(msg, sentAt) {
  current = { id: msg.id, sentAt, firstAudioAt: null, playStartAt: null };
  lastPcm = { rate: M.sampleRate, chunks: [], frames: 0 };
  ui.download.disabled = true;
}

function onAudio(samples) {
  if (current && current.firstAudioAt == null) {
    current.firstAudioAt = performance.now();
    ui.mCttfa.textContent = Math.round(current.firstAudioAt - current.sentAt) + " ms";
  }
  lastPcm.chunks.push(samples.slice());
  lastPcm.frames += samples.length;
  M.lastUtteranceFrames = lastPcm.frames;
  playing = true;
  player.push(samples);
  if (M.state !== "speaking") setState("speaking");
}

function onAudioEnd(msg, dropped) {
  if (dropped) { maybeIdle(); return; }
  const mine = current && current.id === msg.id;
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
  player.end();
  if (!lastPcm.frames) playing = false;
  maybeIdle();
}

function onServerError(msg) {
  if (msg.code === "SESSION_TIMEOUT") return;     // idle: the socket closes and the client reconnects
  showError(msg.code, msg.message || "error", "socket");
  if (msg.id != null && current && current.id === msg.id) player.end();
  if (msg.code === "TTS_NOT_READY") {
    setState("loading", "");
    clearTimeout(notReadyPoll);
    notReadyPoll = setTimeout(async () => {
      const r = await checkReady(apiKey);
      if (r.ready) setState(client.busy || playing ? "speaking" : "ready");
    }, 1000);
    return;
  }
  if (msg.recoverable === false) { setState("error", ""); return; }
  maybeIdle();
}

// ------------------------------------------------------------------ speak / stop
const METRIC_CELLS = [ui.mTtfa, ui.mCttfa, ui.mRtf, ui.mAudio];

async function speak() {
  const text = ui.text.value.trim();
  if (!text) {
    showError("EMPTY_TEXT", "Type some text to speak first.", "page");
    ui.text.focus();
    return;
  }
  if (!client.connected) {
    showError("NOT_CONNECTED", "Not connected to the server yet; wait for “ready”.", "page");
    return;
  }
  clearError();
  await player.settled(3000);
  // resume() waits for the browser to allow audio (autoplay rules, no output device): never block on it
  await player.resume(500);
  // interrupt: the server cancels what it is saying; the client drops its audio, the player its queue
  flushPlayer();
  for (const cell of METRIC_CELLS) cell.textContent = "…";
  const id = client.speak({ text, voice: ui.voice.value, language: ui.language.value || "auto", interrupt: true });
  if (id == null) return;
  setState("speaking");
}

function stop() {
  if (client.busy || client.receivingId != null) {
    for (const cell of [ui.mTtfa, ui.mRtf, ui.mAudio]) if (cell.textContent === "…") cell.textContent = "–";
  }
  flushPlayer();
  if (client.cancel()) M.stopsSent += 1;
  setState(client.ws && M.ready ? "ready" : M.state);
}

// ------------------------------------------------------------------ WAV download
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
async function loadVoices(keepId) {
  try {
    const { voices, defaultId } = await listVoices(apiKey);
    M.voices = voices;
    fillVoices(ui.voice, voices, defaultId, keepId != null ? keepId : ui.voice.value);
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
let recorded = null;                // the last recording, uploaded instead of a file

const recorder = new ClipRecorder({
  onStart: () => {
    ui.record.textContent = "■ Stop recording";
    ui.record.classList.add("recording");
    ui.record.setAttribute("aria-pressed", "true");
  },
  onTick: (secs) => { ui.recStatus.textContent = `Recording… ${secs.toFixed(1)} s (aim for 3–10 s)`; },
  onDone: (file, secs) => {
    recorded = file;
    ui.recStatus.textContent = `Recorded ${secs.toFixed(1)} s. It will be uploaded instead of a file.`;
    ui.preview.src = URL.createObjectURL(file);
    ui.preview.hidden = false;
    ui.record.textContent = "● Record again";
    ui.record.classList.remove("recording");
    ui.record.setAttribute("aria-pressed", "false");
    ui.clip.value = "";
  },
});

async function toggleRecord() {
  try { await recorder.toggle(); } catch (e) { showError(e.code, e.message, "page"); }
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
    const v = await addVoice(apiKey, fd);
    const id = v.voice_id || v.id;
    await loadVoices(id);
    if (id) selectVoice(ui.voice, id);
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
document.addEventListener("pointerdown", () => player.unlock(), { capture: true });
document.addEventListener("keydown", () => player.unlock(), { capture: true });

M.speak = (text) => { if (text != null) ui.text.value = text; return speak(); };
M.stop = stop;
M.reloadVoices = () => loadVoices();
M.dropConnection = () => client.drop();   // for tests: the socket drops, the page reconnects

setState("connecting");
loadVoices();
client.open();
