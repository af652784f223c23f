// Audio playback for the /speak page: an AudioContext and the AudioWorklet in pcm-worklet.js,
// fed float32 PCM chunks as they arrive; and the WAV file of an utterance, built in the page.
//
// The context runs at the session's rate where the browser allows it (the server then resamples
// nothing and the browser converts to the device rate). If the browser refuses that rate, the
// context uses its default rate and the page asks the server for that rate when the server
// offers it (its `ready` lists `sample_rates`).

const WORKLET_URL = new URL("pcm-worklet.js", import.meta.url).toString();

function createContext(rate) {
  const AC = window.AudioContext || window.webkitAudioContext;
  if (rate) {
    try { return new AC({ sampleRate: rate, latencyHint: "interactive" }); } catch (_) { /* below */ }
  }
  return new AC({ latencyHint: "interactive" });
}

export function withTimeout(promise, ms) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error("timeout")), ms))]);
}

/**
 * stats (shown to tests) gets: contextRate, contextState, framesToWorklet, chunksToWorklet, and what
 * the worklet reports back: workletFramesReceived, workletChunksReceived, workletFramesPlayed,
 * workletBuffered, workletPlaying, underruns, flushes.
 * hooks: onStarted() (the worklet started playing an utterance), onDrained() (it played all it had),
 * onError(error) (no audio output).
 */
export class Player {
  constructor({ stats = {}, hooks = {} } = {}) {
    this.stats = stats;
    this.hooks = hooks;
    this.ctx = null;
    this.node = null;
    this.audioReady = null;          // the promise of the current setup
    Object.assign(stats, {
      contextRate: 0, contextState: "", framesToWorklet: 0, chunksToWorklet: 0,
      workletFramesReceived: 0, workletChunksReceived: 0, workletFramesPlayed: 0, workletBuffered: 0,
      workletPlaying: false, underruns: 0, flushes: 0,
    });
  }

  /** The context's rate (0 before the first setup). */
  get rate() { return this.ctx ? this.ctx.sampleRate : 0; }

  /** (Re)create the context at `rate` (or the browser's default) with the worklet node. */
  setup(rate) {
    const M = this.stats;
    this.audioReady = (async () => {
      if (this.ctx) { try { await this.ctx.close(); } catch (_) { /* closed */ } }
      const ctx = this.ctx = createContext(rate);
      this.node = null;
      M.contextRate = ctx.sampleRate;
      M.contextState = ctx.state;
      ctx.onstatechange = () => { M.contextState = ctx.state; };
      await ctx.audioWorklet.addModule(WORKLET_URL);
      const node = new AudioWorkletNode(ctx, "makima-pcm-player", {
        numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: {
          prebufferFrames: Math.round(ctx.sampleRate * 0.05),
          rebufferFrames: Math.round(ctx.sampleRate * 0.12),
        },
      });
      node.port.onmessage = (e) => this._onMessage(e.data);
      node.connect(ctx.destination);
      this.node = node;
      M.workletFramesReceived = M.workletChunksReceived = M.workletFramesPlayed = 0;
      return ctx;
    })();
    this.audioReady.catch((e) => { if (this.hooks.onError) this.hooks.onError(e); });
    return this.audioReady;
  }

  /** A context whose rate is one of `rates`: the current one, or a new one at `preferred`. */
  async ensure(preferred, rates) {
    if (this.audioReady) { try { await this.audioReady; } catch (_) { /* set up again below */ } }
    if (this.ctx && (rates || [preferred]).includes(this.ctx.sampleRate)) return this.ctx;
    return this.setup(preferred);
  }

  /** Wait (at most `ms`) for the current setup; never throws (a failure is reported by setup). */
  async settled(ms) {
    if (this.audioReady) { try { await withTimeout(this.audioReady, ms); } catch (_) { /* reported */ } }
  }

  /** Ask the browser to run the context (autoplay rules, no output device): never blocks longer than `ms`. */
  async resume(ms) {
    if (this.ctx && this.ctx.state !== "running") {
      try { await withTimeout(this.ctx.resume(), ms); } catch (_) { /* later */ }
    }
  }

  /** After a user gesture: let a suspended context start. */
  unlock() { if (this.ctx && this.ctx.state === "suspended") this.ctx.resume().catch(() => {}); }

  _onMessage(msg) {
    const M = this.stats;
    if (msg.type === "stats") {
      M.workletFramesReceived = msg.framesReceived;
      M.workletChunksReceived = msg.chunksReceived;
      M.workletFramesPlayed = msg.framesPlayed;
      M.underruns = msg.underruns;
      M.flushes = msg.flushes;
      M.workletBuffered = msg.buffered;
      M.workletPlaying = msg.playing;
    } else if (msg.type === "started") {
      if (this.hooks.onStarted) this.hooks.onStarted();
    } else if (msg.type === "drained") {
      if (this.hooks.onDrained) this.hooks.onDrained();
    }
  }

  /** Queue float32 samples (the buffer is transferred to the worklet). */
  push(samples) {
    if (!this.node) return;
    const n = samples.length;       // the buffer is transferred: count before posting
    this.node.port.postMessage({ type: "pcm", samples }, [samples.buffer]);
    this.stats.framesToWorklet += n;
    this.stats.chunksToWorklet += 1;
  }

  /** No more audio of this utterance: play out what is queued. */
  end() { if (this.node) this.node.port.postMessage({ type: "end" }); }

  /** Silence at once: drop everything queued. */
  flush() { if (this.node) this.node.port.postMessage({ type: "flush" }); }
}

/** A 16-bit mono WAV file of float32 chunks. */
export function wavBlob(chunks, frames, rate) {
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
