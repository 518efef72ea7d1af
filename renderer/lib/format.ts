// Numbers as people read them: sizes in binary units (as qemu-img prints them), rates,
// durations and times.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

export function size(bytes: number): string {
  if (!Number.isFinite(bytes)) return '–';
  let v = Math.abs(bytes);
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  const digits = i === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
  return `${bytes < 0 ? '-' : ''}${v.toFixed(digits).replace(/\.0+$/, '')} ${UNITS[i]}`;
}

export function rate(bytesPerSecond: number): string {
  return `${size(bytesPerSecond)}/s`;
}

export function duration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return '–';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, '0')} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${String(m % 60).padStart(2, '0')} min`;
}

export function percent(done: number, total: number): string {
  if (total <= 0) return '0%';
  return `${Math.min(100, Math.floor((done / total) * 100))}%`;
}

export function dateTime(ms: number): string {
  const d = new Date(ms);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** The last part of a path (the file's name). */
export function baseName(path: string): string {
  const i = path.replace(/\/+$/, '').lastIndexOf('/');
  return i < 0 ? path : path.slice(i + 1);
}

export function dirName(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

export { commandLine, shellQuote } from '../../core/command-line';
