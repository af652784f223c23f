// The voice library for the /speak page: list the voices (GET /api/v1/voices), fill the picker,
// add a voice (POST /api/v1/voices, multipart), and record a clip with the microphone.

import { apiUrl, authHeaders, httpError } from "./client.js";

/** {voices, defaultId}: every voice of the library and the server's default voice id ("" if none). */
export async function listVoices(apiKey) {
  const r = await fetch(apiUrl("api/v1/voices?limit=1000"), { headers: authHeaders(apiKey), cache: "no-store" });
  if (!r.ok) throw await httpError(r);
  const body = await r.json();
  // default_voice: a voice id, or {voice_id, reason}
  const dv = body.default_voice;
  return { voices: body.voices || [], defaultId: dv && typeof dv === "object" ? dv.voice_id : dv || "" };
}

/** POST the form (file, name, transcript, language, voice_id?, x_vector_only); the new voice's record. */
export async function addVoice(apiKey, form) {
  const r = await fetch(apiUrl("api/v1/voices"), { method: "POST", body: form, headers: authHeaders(apiKey) });
  if (!r.ok) throw await httpError(r);
  const body = await r.json().catch(() => ({}));
  return (body && (body.voice || body)) || {};
}

export function voiceLabel(v) {
  const name = v.name || v.voice_id;
  const bits = [];
  if (v.language && v.language !== "auto") bits.push(v.language);
  if (v.builtin) bits.push("built-in");
  else if (v.generated) bits.push("generated");
  else if (v.seed) bits.push("seed");
  else bits.push("cloned");
  return bits.length ? `${name} (${bits.join(", ")})` : name;
}

export function option(value, text, disabled) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  o.disabled = !!disabled;
  return o;
}

/** Select `id` in `select` when it is there and usable. */
export function selectVoice(select, id) {
  if ([...select.options].some((o) => o.value === id && !o.disabled)) select.value = id;
}

/** The picker: "Server default" first, then each voice (a voice without its clip yet is disabled). */
export function fillVoices(select, voices, defaultId, keep) {
  select.textContent = "";
  const listed = voices.some((v) => v.voice_id === defaultId);
  select.appendChild(option("", "Server default" + (defaultId && !listed ? ` (${defaultId})` : "")));
  for (const v of voices) {
    const noClip = v.has_audio === false && !v.builtin && !v.generated;
    select.appendChild(option(v.voice_id,
      voiceLabel(v) + (v.voice_id === defaultId ? " · default" : "") + (noClip ? " · no clip yet" : ""),
      noClip));
  }
  selectVoice(select, keep || "");
}

function recordingExt(type) {
  if (/webm/.test(type)) return "webm";
  if (/ogg/.test(type)) return "ogg";
  if (/mp4|aac|m4a/.test(type)) return "m4a";
  if (/wav/.test(type)) return "wav";
  return "webm";
}

/**
 * A clip from the microphone (MediaRecorder). hooks: onStart(), onTick(seconds), onDone(file, seconds).
 * toggle() starts, or stops a recording; it throws an Error with a `code` when there is no recorder
 * or no microphone.
 */
export class ClipRecorder {
  constructor(hooks = {}) {
    this.hooks = hooks;
    this.recorder = null;
  }

  get recording() { return !!(this.recorder && this.recorder.state === "recording"); }

  async toggle() {
    if (this.recording) { this.recorder.stop(); return; }
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      const e = new Error("Recording is not available in this browser (it needs HTTPS or localhost).");
      e.code = "NO_RECORDER";
      throw e;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    } catch (err) {
      const e = new Error("The microphone is not available: " + err.message);
      e.code = "MIC";
      throw e;
    }
    const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
    const mimeType = types.find((t) => MediaRecorder.isTypeSupported && MediaRecorder.isTypeSupported(t));
    const recorder = this.recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    const chunks = [];
    const started = performance.now();
    const seconds = () => (performance.now() - started) / 1000;
    const timer = setInterval(() => this.hooks.onTick && this.hooks.onTick(seconds()), 200);
    recorder.ondataavailable = (e) => { if (e.data && e.data.size) chunks.push(e.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      clearInterval(timer);
      const type = recorder.mimeType || mimeType || "audio/webm";
      const file = new File(chunks, "recording." + recordingExt(type), { type });
      if (this.hooks.onDone) this.hooks.onDone(file, seconds());
    };
    recorder.start(250);
    if (this.hooks.onStart) this.hooks.onStart();
  }
}
