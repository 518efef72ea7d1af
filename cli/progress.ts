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
