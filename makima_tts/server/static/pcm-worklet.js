// AudioWorklet processor for makima-tts /speak: plays mono float32 PCM chunks posted from the page.
//
// A small jitter buffer: playback starts as soon as the first chunk arrives (or once `prebuffer`
// frames are queued, whichever is less), then plays gaplessly. When the queue runs dry before the
// utterance has ended it outputs silence and waits until `rebuffer` frames are queued again (an
// underrun). "flush" drops everything at once (Stop). The processor reports what it received and
// played back to the page (port.postMessage), so tests count what really reached the worklet.
//
// Messages in:  {type: "pcm", samples: Float32Array}  {type: "end"}  {type: "flush"}  {type: "stats"}
// Messages out: {type: "stats", ...counters}  {type: "started"}  {type: "drained"}  {type: "flushed"}

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.prebuffer = o.prebufferFrames || Math.round(sampleRate * 0.05);
    this.rebuffer = o.rebufferFrames || Math.round(sampleRate * 0.12);
    this.queue = [];
    this.offset = 0;          // read position in queue[0]
    this.buffered = 0;        // frames queued and not yet played
    this.playing = false;     // false while (re)buffering
    this.ended = true;        // the page said no more audio is coming for now
    this.started = false;     // reported "started" for the current utterance
    this.starved = false;     // ran dry mid-utterance: wait for `rebuffer` frames
    this.framesReceived = 0;
    this.chunksReceived = 0;
    this.framesPlayed = 0;
    this.underruns = 0;
    this.flushes = 0;
    this.quanta = 0;
    this.dirty = false;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    switch (msg && msg.type) {
      case "pcm": {
        const s = msg.samples;
        if (!s || !s.length) return;
        this.queue.push(s);
        this.buffered += s.length;
        this.framesReceived += s.length;
        this.chunksReceived += 1;
        if (this.ended) {           // first chunk of a new utterance: start with it
          this.ended = false;
          this.started = false;
          this.starved = false;
          this.playing = false;
        }
        if (!this.playing) {
          const need = this.starved ? this.rebuffer : Math.min(this.prebuffer, s.length);
          if (this.buffered >= need) this.playing = true;
        }
        this.dirty = true;
        break;
      }
      case "end":
        this.ended = true;
        if (this.buffered > 0) this.playing = true;   // play out the tail below the threshold
        else this.finish();
        this.dirty = true;
        break;
      case "flush":
        this.queue = [];
        this.offset = 0;
        this.buffered = 0;
        this.playing = false;
        this.ended = true;
        this.started = false;
        this.flushes += 1;
        this.port.postMessage({ type: "flushed" });
        this.report();
        break;
      case "stats":
        this.report();
        break;
    }
  }

  finish() {
    this.playing = false;
    this.started = false;
    this.report();
    this.port.postMessage({ type: "drained" });
  }

  report() {
    this.dirty = false;
    this.port.postMessage({
      type: "stats",
      framesReceived: this.framesReceived,
      chunksReceived: this.chunksReceived,
      framesPlayed: this.framesPlayed,
      buffered: this.buffered,
      underruns: this.underruns,
      flushes: this.flushes,
      playing: this.playing,
    });
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const n = ch0.length;
    let written = 0;
    if (this.playing) {
      if (!this.started) {
        this.started = true;
        this.port.postMessage({ type: "started" });
      }
      while (written < n && this.queue.length) {
        const head = this.queue[0];
        const take = Math.min(n - written, head.length - this.offset);
        ch0.set(head.subarray(this.offset, this.offset + take), written);
        written += take;
        this.offset += take;
        if (this.offset >= head.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      this.buffered -= written;
      this.framesPlayed += written;
      if (this.buffered <= 0) {
        this.buffered = 0;
        if (this.ended) this.finish();
        else {
          this.playing = false;     // underrun: wait for `rebuffer` frames
          this.underruns += 1;
          this.starved = true;
        }
      }
    }
    if (written < n) ch0.fill(0, written);
    for (let c = 1; c < out.length; c++) out[c].set(ch0);
    if (written) this.dirty = true;
    // about every 85 ms at 24 kHz (20 render quanta)
    if (++this.quanta % 20 === 0 && this.dirty) this.report();
    return true;
  }
}

registerProcessor("makima-pcm-player", PcmPlayer);
