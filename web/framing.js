// PCM messages for the WebSocket ingest at /ws with "framing": "crc32".
//
// One binary message, all little-endian:
//   magic u32 = 0x12345678 | message_type u8 = 0x01 (audio) | seq u32 | payload_length u32
//   | payload (PCM bytes) | crc32 u32 of the payload (IEEE, the same as Python's zlib.crc32)
// The header is 13 bytes, the trailer 4. seq is 0 for the first audio message after
// each {"type": "start"} and counts up by one.
//
// A classic script (no build step): defines the global `AvatarFraming`.
(function (root) {
  "use strict";

  const MAGIC = 0x12345678;
  const MSG_AUDIO = 0x01;
  const HEADER_BYTES = 13;
  const TRAILER_BYTES = 4;

  const CRC_TABLE = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    CRC_TABLE[n] = c >>> 0;
  }

  /** CRC-32 (IEEE 802.3, reflected, init and final xor 0xFFFFFFFF) of a Uint8Array. */
  function crc32(bytes, crc = 0) {
    crc = (crc ^ 0xffffffff) >>> 0;
    for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
    return (crc ^ 0xffffffff) >>> 0;
  }

  /** Mono float samples as PCM bytes, "f32le" or "s16le", clipped to -1..1 (the browser's
   *  audio processing can overshoot full scale slightly). */
  function pcmBytes(samples, format) {
    if (format === "f32le") {
      const out = new DataView(new ArrayBuffer(samples.length * 4));
      for (let i = 0; i < samples.length; i++) out.setFloat32(4 * i, Math.max(-1, Math.min(1, samples[i])), true);
      return new Uint8Array(out.buffer);
    }
    if (format === "s16le") {
      const out = new DataView(new ArrayBuffer(samples.length * 2));
      for (let i = 0; i < samples.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        out.setInt16(2 * i, Math.round(s < 0 ? s * 32768 : s * 32767), true);
      }
      return new Uint8Array(out.buffer);
    }
    throw new Error(`unknown PCM format '${format}'`);
  }

  /** One audio message: header, payload, CRC trailer. Returns an ArrayBuffer. */
  function audioMessage(seq, payload) {
    const buf = new ArrayBuffer(HEADER_BYTES + payload.length + TRAILER_BYTES);
    const view = new DataView(buf);
    view.setUint32(0, MAGIC, true);
    view.setUint8(4, MSG_AUDIO);
    view.setUint32(5, seq >>> 0, true);
    view.setUint32(9, payload.length, true);
    new Uint8Array(buf, HEADER_BYTES, payload.length).set(payload);
    view.setUint32(HEADER_BYTES + payload.length, crc32(payload), true);
    return buf;
  }

  root.AvatarFraming = { MAGIC, MSG_AUDIO, HEADER_BYTES, TRAILER_BYTES, crc32, pcmBytes, audioMessage };
})(typeof self !== "undefined" ? self : globalThis);
