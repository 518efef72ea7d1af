/** QEMU's size_to_str: "%0.3g %sB" with binary prefixes (used in human output). */
export function sizeToStr(v: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  if (v > 0) {
    const e = Math.floor(Math.log2(v / (1000 / 1024))) + 1; // frexp's exponent
    i = Math.max(0, Math.trunc((e - 1) / 10));
  }
  return `${formatG3(v / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/** printf("%0.3g") for the values size_to_str produces. */
export function formatG3(n: number): string {
  if (n === 0) return '0';
  const s = n.toPrecision(3);
  if (s.includes('e')) return s;
  return s.includes('.') ? s.replace(/\.?0+$/, '') : s;
}

const SUFFIX_SHIFT: Record<string, bigint> = { B: 0n, K: 10n, M: 20n, G: 30n, T: 40n, P: 50n, E: 60n };

/**
 * QEMU's qemu_strtosz: a decimal number with an optional fraction, or a hexadecimal one
 * (0x10000), then an optional binary suffix (B, K, M, G, T, P, E, any case). Returns the exact
 * value, 'invalid' for text it refuses (a sign, a trailing word, a fraction without a suffix),
 * or 'range' for a value of 2^64 or more.
 */
export function strtosz(text: string): bigint | 'invalid' | 'range' {
  const m = /^[ \t\n\v\f\r]*(\+?)([0-9]+)/.exec(text);
  if (!m) return 'invalid';
  let i = m[0].length;
  let val = BigInt(m[2]!);
  if (val >= 1n << 64n) return 'range';
  let valf = 0n;
  let hex = false;
  if (val === 0n && (text[i] === 'x' || text[i] === 'X')) {
    const h = /^[0-9a-fA-F]+/.exec(text.slice(i + 1));
    if (h) {
      val = BigInt(`0x${h[0]}`);
      if (val >= 1n << 64n) return 'range';
      i += 1 + h[0].length;
      if (text[i] === '.') return 'invalid';
      hex = true;
    }
  } else if (text[i] === '.') {
    const f = /^\.[0-9]*(?:[eE][+-]?[0-9]+)?/.exec(text.slice(i))![0];
    if (/[eE]/.test(f)) return 'invalid';
    if (f.length > 1) valf = BigInt(Math.floor(Number(`0${f}`) * 2 ** 64));
    i += f.length;
  }
  void hex; // QEMU only warns about a suffix on a hexadecimal number
  let shift = 0n;
  const c = text[i]?.toUpperCase();
  if (c !== undefined && c in SUFFIX_SHIFT) { shift = SUFFIX_SHIFT[c]!; i++; }
  if (i !== text.length) return 'invalid';
  if (shift === 0n) return valf !== 0n ? 'invalid' : val;
  // 64.64 fixed point times the multiplier, rounding 0.5 up.
  const total = (val << (64n + shift)) + (valf << shift);
  const result = (total >> 64n) + ((total >> 63n) & 1n);
  return result >= 1n << 64n ? 'range' : result;
}
