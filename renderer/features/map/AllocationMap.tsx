// The allocation map: one strip per layer of the selected image's chain across the virtual
// disk, each column split into data, compressed, zero and unallocated in proportion, from the
// `map --summary` buckets (computed in a job process, so a 1 TiB image costs the window nothing).
// A legend, and a readout of the range under the pointer or keyboard cursor.
import { useEffect, useLayoutEffect, useRef, useState, type KeyboardEvent } from 'react';
import { Spinner } from '../../components/ui';
import { client, errorText } from '../../lib/store';
import { baseName, size } from '../../lib/format';
import type { MapSummaryMessage } from '../../../core/protocol/library';

const STRIP_H = 22;
const GAP = 18;
const KINDS = ['data', 'compressed', 'zero', 'unallocated'] as const;
type Kind = (typeof KINDS)[number];
const LABELS: Record<Kind, string> = { data: 'data', compressed: 'compressed', zero: 'reads as zero', unallocated: 'unallocated (falls through)' };

function colors(el: Element): Record<Kind | 'grid', string> {
  const cs = getComputedStyle(el);
  const v = (n: string) => cs.getPropertyValue(`--map-${n}`).trim() || '#888';
  return { data: v('data'), compressed: v('compressed'), zero: v('zero'), unallocated: v('unallocated'), grid: v('grid') };
}

export function AllocationMap({ path, version }: { path: string; version: string }) {
  const wrap = useRef<HTMLDivElement>(null);
  const canvas = useRef<HTMLCanvasElement>(null);
  const [width, setWidth] = useState(0);
  const [summary, setSummary] = useState<MapSummaryMessage | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [cursor, setCursor] = useState<{ layer: number; bucket: number } | null>(null);

  useLayoutEffect(() => {
    const el = wrap.current!;
    const ro = new ResizeObserver(() => setWidth(Math.floor(el.clientWidth)));
    ro.observe(el);
    setWidth(Math.floor(el.clientWidth));
    return () => ro.disconnect();
  }, []);

  // One bucket per pixel column, at most 1024 (what the summary is made for).
  const buckets = Math.max(16, Math.min(1024, width));
  useEffect(() => {
    if (!width) return;
    let live = true;
    setError(null);
    const t = setTimeout(() => {
      client.request('image.mapSummary', { path, buckets }).then((s) => { if (live) setSummary(s); }, (err) => { if (live) setError(errorText(err)); });
    }, 120);
    return () => { live = false; clearTimeout(t); };
  }, [path, buckets, version, width]);

  useEffect(() => {
    const c = canvas.current;
    if (!c || !summary || !width) return;
    const dpr = window.devicePixelRatio || 1;
    const h = summary.layers.length * (STRIP_H + GAP);
    c.width = Math.round(width * dpr);
    c.height = Math.round(h * dpr);
    c.style.width = `${width}px`;
    c.style.height = `${h}px`;
    const g = c.getContext('2d')!;
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, width, h);
    const col = colors(c);
    const colW = width / summary.buckets;
    summary.layers.forEach((l, li) => {
      const top = li * (STRIP_H + GAP) + GAP - 4;
      g.fillStyle = col.grid;
      g.fillRect(0, top - 1, width, STRIP_H + 2);
      for (let k = 0; k < summary.buckets; k++) {
        const total = KINDS.reduce((a, kind) => a + l[kind][k]!, 0) || 1;
        let y = top;
        for (const kind of KINDS) {
          const part = (l[kind][k]! / total) * STRIP_H;
          if (part <= 0) continue;
          g.fillStyle = col[kind];
          g.fillRect(k * colW, y, Math.max(colW, 1), part);
          y += part;
        }
      }
    });
  }, [summary, width]);

  const at = (layer: number, bucket: number) => {
    if (!summary) return null;
    const l = summary.layers[layer];
    if (!l) return null;
    const start = bucket * summary.bucketSize;
    const end = Math.min(summary.virtualSize, start + summary.bucketSize);
    return { l, start, end, parts: KINDS.map((k) => [k, l[k][bucket]!] as const).filter(([, v]) => v > 0) };
  };
  const readout = cursor ? at(cursor.layer, cursor.bucket) : null;

  const onMove = (e: React.MouseEvent) => {
    if (!summary) return;
    const r = (e.currentTarget as HTMLElement).getBoundingClientRect();
    const bucket = Math.min(summary.buckets - 1, Math.max(0, Math.floor(((e.clientX - r.left) / r.width) * summary.buckets)));
    const layer = Math.min(summary.layers.length - 1, Math.max(0, Math.floor((e.clientY - r.top) / (STRIP_H + GAP))));
    setCursor({ layer, bucket });
  };
  const onKey = (e: KeyboardEvent) => {
    if (!summary) return;
    const c = cursor ?? { layer: 0, bucket: 0 };
    const step = e.shiftKey ? Math.max(1, Math.floor(summary.buckets / 16)) : 1;
    const moves: Record<string, () => { layer: number; bucket: number }> = {
      ArrowRight: () => ({ ...c, bucket: Math.min(summary.buckets - 1, c.bucket + step) }),
      ArrowLeft: () => ({ ...c, bucket: Math.max(0, c.bucket - step) }),
      ArrowDown: () => ({ ...c, layer: Math.min(summary.layers.length - 1, c.layer + 1) }),
      ArrowUp: () => ({ ...c, layer: Math.max(0, c.layer - 1) }),
    };
    const m = moves[e.key];
    if (m) { e.preventDefault(); setCursor(m()); }
  };

  return (
    <div>
      <div className="mb-2 flex flex-wrap gap-x-4 gap-y-1 text-xs text-slate-600 dark:text-slate-300" aria-label="Legend">
        {KINDS.map((k) => (
          <span key={k} className="flex items-center gap-1.5">
            <span className={`inline-block h-3 w-3 rounded-sm border border-slate-300 dark:border-slate-600 map-swatch-${k}`} />{LABELS[k]}
          </span>
        ))}
      </div>
      <div ref={wrap} className="relative">
        {summary && summary.layers.map((l, li) => (
          <div key={l.filename + li} className="pointer-events-none absolute left-0 truncate text-[11px] text-slate-600 dark:text-slate-300" style={{ top: li * (STRIP_H + GAP) - 1 }}>
            {li === 0 ? 'this image' : `backing ${li}`}: {baseName(l.filename)}
          </div>
        ))}
        <canvas
          ref={canvas}
          tabIndex={0}
          role="img"
          aria-label={summary ? `Allocation of ${summary.layers.length} layer${summary.layers.length > 1 ? 's' : ''} across ${size(summary.virtualSize)}; use the arrow keys to read ranges` : 'Allocation map loading'}
          onMouseMove={onMove}
          onMouseLeave={() => setCursor(null)}
          onKeyDown={onKey}
          onBlur={() => setCursor(null)}
          className="block w-full"
          data-testid="allocation-map"
        />
        {!summary && !error && <div className="flex h-16 items-center justify-center"><Spinner label="Reading the allocation" /></div>}
      </div>
      {error && <p role="alert" className="mt-2 text-sm text-red-700 dark:text-red-400">{error}</p>}
      <p aria-live="polite" className="mt-2 min-h-[2.5rem] text-xs tabular-nums text-slate-600 dark:text-slate-300" data-testid="map-readout">
        {readout
          ? <>{readout.l.depth === 0 ? 'This image' : `Backing file ${readout.l.depth} (${baseName(readout.l.filename)})`}, {size(readout.start)} to {size(readout.end)}:{' '}
              {readout.parts.map(([k, v]) => `${size(v)} ${LABELS[k]}`).join(', ')}</>
          : summary ? `${summary.buckets} columns of ${size(summary.bucketSize)} each. Point at a strip (or focus it and use the arrow keys) to read a range.` : ''}
      </p>
    </div>
  );
}
