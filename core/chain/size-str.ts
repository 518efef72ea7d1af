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
