// The -p progress line: percent, bytes, throughput and ETA on a terminal; nothing otherwise.
import type { Progress } from '../core/jobs/job';
import { sizeToStr } from '../core/chain/size-str';

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
  const print = () => { last = current; write(`    (${current.toFixed(2)}/100%)\r`); };
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
