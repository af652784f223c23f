// makima-tts WebSocket protocol client (docs/protocol.md), for the /speak page: connect (after
// GET /ready says the model is loaded), reconnect with a backoff, send `start`, `speak`, `cancel`,
// and hand the page decoded PCM of the utterance being received. Also the small HTTP helpers the
// page's other modules use (URLs relative to the page, the API key, errors in words).
//
// Connection: the server sends `ready` on connect, with the session defaults and what it accepts
// (`sample_rates`, `languages`, `max_text_chars`). The client then asks `hooks.onHello(ready)` for
// the rate it wants and sends `start` with it; the server's answer (a second `ready`) makes the
// session ready (`hooks.onReady`). Nothing is spoken before that answer, so every utterance is in
// the format and rate the page asked for.

export const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

export function apiUrl(path) { return new URL(path, location.href).toString(); }

export function authHeaders(apiKey, extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

/** An Error with the server's error code and message (`{error: {code, message}}` or `{detail}`). */
export async function httpError(resp) {
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

/** GET /ready: {ready: true} or {ready: false, reason, status} or {ready: false, down: true}. */
export async function checkReady(apiKey) {
  try {
    const r = await fetch(apiUrl("ready"), { headers: authHeaders(apiKey), cache: "no-store" });
    if (r.ok) return { ready: true };
    let reason = "";
    try { const b = await r.json(); reason = b.reason || (b.error && b.error.message) || ""; } catch (_) { /* */ }
    return { ready: false, reason, status: r.status };
  } catch (e) {
    return { ready: false, reason: "server unreachable", down: true };
  }
}

/**
 * One WebSocket session at a time, re-opened when it drops.
 *
 * hooks (all optional):
 *   onState(state, detail)      "connecting" | "loading", while there is no session
 *   onHello(ready) -> rate      the on-connect `ready`; returns (or resolves to) the sample rate for `start`
 *   onReady(ready)              the answer to `start`: the session is ready
 *   onAudioStart(msg, sentAt)   an utterance not dropped here starts; sentAt: when `speak` left (ms)
 *   onAudio(samples)            float32 PCM of that utterance
 *   onAudioEnd(msg, dropped)    its end (dropped: it was cancelled here, its audio was not handed on)
 *   onCancelled(msg), onStatus(msg), onError(msg)
 *   onClose(event, lost)        the socket closed (lost: utterances were pending); a reconnect follows
 *
 * stats (an object the page shows to tests) gets: connects, reconnects, bytesReceived,
 * binaryMessages, cancelledMessages, lastCancelled, messages (the last 100 JSON messages, in short).
 */
export class SpeakClient {
  constructor({ apiKey = "", format = "pcm_f32le", stats = {}, hooks = {} } = {}) {
    this.apiKey = apiKey;
    this.format = format;           // asked for in `start`; the session's, once ready
    this.stats = stats;
    this.hooks = hooks;
    this.ws = null;
    this.hello = null;              // the on-connect `ready`
    this.ready = null;              // the answer to `start`
    this.attempt = 0;
    this.reconnectTimer = null;
    this.readyPoll = null;
    this.nextId = 1;
    this.pending = new Map();       // id -> {sentAt}: sent, not ended
    this.dropped = new Set();       // ids cancelled here: their audio is dropped
    this.receivingId = null;        // utterance whose audio is arriving
    this.leftover = null;           // bytes of a split sample
    Object.assign(stats, {
      connects: 0, reconnects: 0, bytesReceived: 0, binaryMessages: 0,
      cancelledMessages: 0, lastCancelled: null, messages: [],
    });
  }

  get connected() { return !!(this.ws && this.ws.readyState === WebSocket.OPEN && this.ready); }

  /** Utterances sent and not yet ended or cancelled. */
  get busy() { return this.pending.size > 0; }

  _hook(name, ...args) { const f = this.hooks[name]; return f ? f(...args) : undefined; }

  /** Connect once the server is ready (polls GET /ready while the model loads). */
  async open() {
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.readyPoll);
    this._hook("onState", "connecting", this.attempt ? "retry " + this.attempt : "");
    const r = await checkReady(this.apiKey);
    if (!r.ready && !r.down && r.status === 503) {
      this._hook("onState", "loading", r.reason || "");
      this.readyPoll = setTimeout(() => this.open(), 1000);
      return;
    }
    if (r.down) { this._scheduleReconnect(); return; }
    this._connect();
  }

  /** For tests: the socket drops, the client reconnects. */
  drop() { if (this.ws) this.ws.close(); }

  _connect() {
    const u = new URL("api/v1/speak", location.href);
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (this.apiKey) u.searchParams.set("api_key", this.apiKey);
    u.hash = "";
    let sock;
    try { sock = new WebSocket(u.toString()); } catch (e) { this._scheduleReconnect(); return; }
    this.ws = sock;
    this.hello = this.ready = null;
    sock.binaryType = "arraybuffer";
    this.stats.connects += 1;
    sock.onmessage = (e) => {
      if (sock !== this.ws) return;
      if (typeof e.data === "string") this._onJson(sock, e.data);
      else this._onBinary(e.data);
    };
    sock.onclose = (e) => {
      if (sock !== this.ws) return;
      this.ws = null;
      this.hello = this.ready = null;
      const lost = this.pending.size > 0;
      this.dropAll();
      this.receivingId = null;
      this._hook("onClose", e, lost);
      this._scheduleReconnect();
    };
    sock.onerror = () => { /* onclose follows */ };
  }

  _scheduleReconnect() {
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.stats.reconnects += 1;
    this._hook("onState", "connecting", `reconnecting in ${(delay / 1000).toFixed(delay < 1000 ? 1 : 0)} s`);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.open(), delay);
  }

  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  /** Drop the audio of every utterance sent (pending) here at once. */
  dropAll() {
    for (const id of this.pending.keys()) this.dropped.add(id);
    this.pending.clear();
  }

  /** Send `speak`; returns its id, or null when the socket is not open. */
  speak({ text, voice, language, interrupt = false }) {
    if (interrupt) this.dropAll();       // the server cancels what it is saying: drop its audio here at once
    const id = "u" + this.nextId++;
    const msg = { type: "speak", id, text, interrupt };
    if (voice) msg.voice = voice;
    if (language) msg.language = language;
    this.pending.set(id, { sentAt: performance.now() });
    if (!this.send(msg)) { this.pending.delete(id); return null; }
    return id;
  }

  /** Drop everything here and send `cancel`; true when it was sent. */
  cancel() {
    this.dropAll();
    if (this.receivingId != null) this.dropped.add(this.receivingId);
    return this.send({ type: "cancel" });
  }

  _log(msg) {
    const log = this.stats.messages;
    log.push({ type: msg.type, id: msg.id, code: msg.code, ids: msg.ids, t: Math.round(performance.now()) });
    if (log.length > 100) log.shift();
  }

  _onJson(sock, text) {
    let msg;
    try { msg = JSON.parse(text); } catch (_) { return; }
    this._log(msg);
    switch (msg.type) {
      case "ready": this._onReady(sock, msg); break;
      case "audio_start": this._onAudioStart(msg); break;
      case "audio_end": this._onAudioEnd(msg); break;
      case "cancelled":
        this.stats.cancelledMessages += 1;
        this.stats.lastCancelled = msg.ids || [];
        for (const id of (msg.ids || [])) { this.pending.delete(id); this.dropped.add(id); }
        this._hook("onCancelled", msg);
        break;
      case "status": this._hook("onStatus", msg); break;
      case "stopped": break;
      case "error":
        if (msg.id != null) this.pending.delete(msg.id);
        this._hook("onError", msg);
        break;
    }
  }

  async _onReady(sock, msg) {
    this.attempt = 0;
    if (!this.hello) {                   // on connect: the server's defaults and what it accepts
      this.hello = msg;
      let rate = msg.sample_rate;
      try { rate = (await this._hook("onHello", msg)) || rate; } catch (_) { /* the server's default */ }
      if (sock !== this.ws) return;
      this.send({ type: "start", format: this.format, sample_rate: rate });
      return;
    }
    this.ready = msg;                    // the answer to our `start`
    this.format = msg.format || this.format;
    await this._hook("onReady", msg);
  }

  _onAudioStart(msg) {
    this.receivingId = msg.id;
    this.leftover = null;
    if (this.dropped.has(msg.id)) return;
    const p = this.pending.get(msg.id);
    this._hook("onAudioStart", msg, p ? p.sentAt : performance.now());
  }

  _onBinary(buf) {
    this.stats.bytesReceived += buf.byteLength;
    this.stats.binaryMessages += 1;
    if (this.receivingId == null || this.dropped.has(this.receivingId)) return;
    let bytes = new Uint8Array(buf);
    if (this.leftover) {
      const joined = new Uint8Array(this.leftover.length + bytes.length);
      joined.set(this.leftover);
      joined.set(bytes, this.leftover.length);
      bytes = joined;
      this.leftover = null;
    }
    const width = this.format === "pcm_s16le" ? 2 : 4;
    const usable = bytes.length - (bytes.length % width);
    if (usable < bytes.length) this.leftover = bytes.slice(usable);
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
    this._hook("onAudio", samples);
  }

  _onAudioEnd(msg) {
    if (this.receivingId === msg.id) this.receivingId = null;
    this.pending.delete(msg.id);
    this._hook("onAudioEnd", msg, this.dropped.has(msg.id));
  }
}
