// The -p progress line: percent, bytes, throughput and ETA on a terminal; nothing otherwise.
import type { Progress } from '../core/jobs/job';
import { sizeToStr } from '../core/chain/size-str';
import { walkChain } from '../core/chain/block-status';
import type { DiskImage } from '../core/engine/image';

export function progressPrinter(enabled: boolean, write: (s: string) => void): { onProgress?: (p: Progress) => void; end: () => void } {
  if (!enabled) return { end: () => {} };
  let shown = false;
  return {
    onProgress: (p) => {
      const pct = p.bytesTotal > 0 ? (100 * p.bytesDone) / p.bytesTotal : 100;
      const secs = p.elapsedMs / 1000;
      const rate = secs > 0 ? p.bytesDone / secs : 0;
      const eta = rate > 0 ? (p.bytesTotal - p.bytesDone) / rate : 0;
      const width = 24;
      const filled = Math.round((pct / 100) * width);
      const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
      const etaStr = `${Math.floor(eta / 60)}:${String(Math.floor(eta % 60)).padStart(2, '0')}`;
      write(`\r[${bar}] ${pct.toFixed(1).padStart(5)}% ${sizeToStr(p.bytesDone)} / ${sizeToStr(p.bytesTotal)}  ${sizeToStr(rate)}/s  ETA ${etaStr}   `);
      shown = true;
    },
    end: () => { if (shown) write('\n'); },
  };
}

/**
 * qemu-img's -p output (util/qemu-progress.c): "    (NN.NN/100%)\r" on stdout, printed at the
 * start (0), whenever the percentage moved more than `minSkip` since the last print, at 100,
 * and (with `final`) once more at the end, then a newline. What a script or a log gets.
 */
export function qemuProgressPrinter(write: (s: string) => void, minSkip: number, final: boolean): { onProgress: (p: Progress) => void; end: (ok?: boolean) => void } {
  let current = 0;
  let last = 0;
  const print = () => { last = current; write(`    (${printfFixed2(current)}/100%)\r`); };
  const at = (pct: number) => {
    current = Math.fround(Math.min(100, pct));
    if (current > last + minSkip || current < last - minSkip || current === 100 || current === 0) print();
  };
  // The first line comes with the first progress (or the end), so that a plan (--dry-run) or
  // a refusal before any work prints none.
  let started = false;
  const start = () => { if (!started) { started = true; at(0); } };
  return {
    // Strata reports progress over time, not per copied run as qemu-img: a report that moved
    // nothing prints nothing (qemu-img would not have reported it).
    onProgress: (p) => {
      start();
      const pct = Math.fround(Math.min(100, p.bytesTotal > 0 ? (100 * p.bytesDone) / p.bytesTotal : 100));
      if (pct !== current) at(pct);
    },
    end: (ok = true) => { start(); if (final && ok) at(100); write('\n'); },
  };
}

/**
 * The -p output of a qemu-img command: Strata's bar on stderr when stdout is a terminal and the
 * command runs as strata; otherwise qemu-img's lines on stdout (see qemuProgressPrinter), which
 * is what qemu-img prints, to a terminal or not.
 */
export function commandProgress(io: { out: (s: string) => void; err: (s: string) => void; isTTY: boolean; program?: string }, enabled: boolean, minSkip: number, final: boolean): { onProgress?: (p: Progress) => void; end: (ok?: boolean) => void } {
  if (!enabled) return { end: () => {} };
  if (io.isTTY && io.program !== 'qemu-img') return progressPrinter(true, io.err);
  return qemuProgressPrinter(io.out, minSkip, final);
}

/**
 * The steps of qemu-img convert's -p for a plain conversion (no -B, -n, -c, snapshot): its
 * first pass counts the source's data by block status (zero runs too with -S 0), its copy
 * loop goes in pieces of at most 2 MiB, and it reports 100 * done / allocated after each
 * piece. Returns each step's end offset in the source and its percentage.
 */
export async function qemuConvertSteps(src: DiskImage, minSparse: number): Promise<{ end: number; pct: number }[]> {
  const BUF = 2 << 20;
  const pieces: number[] = [];
  let allocated = 0;
  for await (const st of walkChain(src)) {
    const counted = st.data || (minSparse === 0 && st.zero);
    if (!counted) continue;
    for (let pos = st.start; pos < st.start + st.length;) {
      const n = Math.min(BUF, st.start + st.length - pos);
      pos += n;
      allocated += n;
      pieces.push(pos, n);
    }
  }
  const steps: { end: number; pct: number }[] = [];
  let done = 0;
  for (let i = 0; i < pieces.length; i += 2) {
    done += pieces[i + 1]!;
    steps.push({ end: pieces[i]!, pct: (100 * done) / allocated });
  }
  return steps;
}

/** qemuProgressPrinter driven by precomputed steps: each is printed once the job passed its end. */
export function qemuStepsPrinter(write: (s: string) => void, steps: { end: number; pct: number }[]): { onProgress: (p: Progress) => void; end: (ok?: boolean) => void } {
  const inner = qemuProgressPrinter(write, 1, true);
  let next = 0;
  let started = false;
  const upTo = (pos: number) => {
    if (!started) { started = true; inner.onProgress({ bytesDone: 0, bytesTotal: 1 } as Progress); }
    while (next < steps.length && steps[next]!.end <= pos) inner.onProgress({ bytesDone: steps[next++]!.pct, bytesTotal: 100 } as Progress);
  };
  return {
    onProgress: (p) => upTo(p.bytesDone),
    end: (ok = true) => { upTo(Number.POSITIVE_INFINITY); inner.end(ok); },
  };
}

/** printf("%.2f", v) for v >= 0: the exact binary value rounded half to even, as glibc does. */
export function printfFixed2(v: number): string {
  const b = new DataView(new ArrayBuffer(8));
  b.setFloat64(0, v);
  const bits = b.getBigUint64(0);
  const exp = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & ((1n << 52n) - 1n);
  // v = mant * 2^e exactly
  const mant = exp === 0 ? frac : frac | (1n << 52n);
  const e = (exp === 0 ? 1 : exp) - 1075;
  let q: bigint;
  if (e >= 0) q = (mant << BigInt(e)) * 100n;
  else {
    const den = 1n << BigInt(-e);
    const num = mant * 100n;
    q = num / den;
    const r2 = (num % den) * 2n;
    if (r2 > den || (r2 === den && (q & 1n) === 1n)) q += 1n;
  }
  const s = q.toString().padStart(3, '0');
  return `${s.slice(0, -2)}.${s.slice(-2)}`;
}
