// AudioWorklet processor "mic-chunker": the microphone, mixed to mono, in fixed chunks.
//
// The audio thread calls process() with 128-sample blocks; this collects them into
// chunks of `chunkMs` milliseconds at the context's `sampleRate` (20 ms: 960 samples
// at 48 kHz) and posts each chunk to the page as a Float32Array (transferred, not
// copied). It writes nothing to its output: connect it to the destination only so
// that the graph keeps pulling it.
class MicChunker extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = (options.processorOptions && options.processorOptions.chunkMs) || 20;
    this.size = Math.round((sampleRate * chunkMs) / 1000);
    this.chunk = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const n = channels[0].length;
    const scale = 1 / channels.length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels.length; c++) s += channels[c][i];
      this.chunk[this.filled++] = s * scale;
      if (this.filled === this.size) {
        this.port.postMessage(this.chunk, [this.chunk.buffer]);
        this.chunk = new Float32Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-chunker", MicChunker);
