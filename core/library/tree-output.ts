// The library as `strata tree` prints it: an indented tree (bases at the root, overlays below,
// shared bases once) with problems and holders on each line, and as JSON in qemu-img's naming.
import { relative } from 'node:path';
import { sizeToStr } from '../chain/size-str';
import { commandLine } from '../command-line';
import type { LibraryImage, LibrarySnapshot } from './types';

export interface TreeImageJson {
  filename: string;
  format: string | null;
  'virtual-size': number;
  'actual-size': number;
  'cluster-size'?: number;
  compat?: string;
  'extended-l2'?: boolean;
  'compression-type'?: string;
  'refcount-bits'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'backing-relative'?: boolean;
  children: string[];
  snapshots: number;
  bitmaps: number;
  'dirty-flag': boolean;
  corrupt: boolean;
  external: boolean;
  'in-use': { pid: number; program: string; vm: string | null } | null;
  problems: string[];
  'problem-details': { code: string; message: string }[];
  fixes: string[];
  candidates?: { filename: string; format: string; 'virtual-size': number; reason: string }[];
}

export function treeJson(snap: LibrarySnapshot): TreeImageJson[] {
  const byReal = new Map(snap.images.map((i) => [i.realPath, i]));
  return snap.images.map((i) => {
    const j: TreeImageJson = {
      filename: i.path,
      format: i.format,
      'virtual-size': i.virtualSize,
      'actual-size': i.actualSize,
      children: i.children.map((c) => byReal.get(c)!.path),
      snapshots: i.snapshots,
      bitmaps: i.bitmaps,
      'dirty-flag': i.dirty,
      corrupt: i.corrupt,
      external: i.external,
      'in-use': i.inUse,
      problems: i.problems.map((p) => p.code),
      'problem-details': i.problems.map((p) => ({ code: p.code, message: p.message })),
      fixes: i.fixes.map((f) => commandLine(f.command)),
    };
    if (i.clusterSize !== null) {
      j['cluster-size'] = i.clusterSize;
      j.compat = i.compat!;
      j['extended-l2'] = i.extendedL2;
      j['compression-type'] = i.compressionType!;
      j['refcount-bits'] = i.refcountBits!;
    }
    if (i.backingName !== null) {
      j['backing-filename'] = i.backingName;
      if (i.backingPath) j['full-backing-filename'] = i.backingPath;
      if (i.backingFormat) j['backing-filename-format'] = i.backingFormat;
      j['backing-relative'] = i.backingRelative;
    }
    if (i.candidates.length) j.candidates = i.candidates.map((c) => ({ filename: c.path, format: c.format, 'virtual-size': c.virtualSize, reason: c.reason }));
    return j;
  });
}

/** How a path is shown: relative to the scanned folder holding it, else as it is. */
function shown(path: string, scanned: string[]): string {
  const root = scanned.filter((r) => path.startsWith(r + '/')).sort((a, b) => b.length - a.length)[0];
  return root && scanned.length === 1 ? relative(root, path) : path;
}

function describe(i: LibraryImage, scanned: string[]): string {
  const parts: string[] = [];
  if (i.format) parts.push(i.format, sizeToStr(i.virtualSize), `${sizeToStr(i.actualSize)} on disk`);
  if (i.snapshots) parts.push(`${i.snapshots} snapshot${i.snapshots > 1 ? 's' : ''}`);
  if (i.bitmaps) parts.push(`${i.bitmaps} bitmap${i.bitmaps > 1 ? 's' : ''}`);
  if (i.children.length > 1) parts.push(`shared by ${i.children.length} overlays`);
  if (i.external) parts.push('outside the scanned folders');
  let line = `${shown(i.path, scanned)}  ${parts.join(', ')}`;
  for (const p of i.problems) line += `  [${p.code}${p.code === 'in-use' && i.inUse ? `: PID ${i.inUse.pid} ${i.inUse.program}${i.inUse.vm ? `, VM '${i.inUse.vm}'` : ''}` : ''}]`;
  return line;
}

export function treeText(snap: LibrarySnapshot): string {
  const byReal = new Map(snap.images.map((i) => [i.realPath, i]));
  const lines: string[] = [];
  const emit = (i: LibraryImage, prefix: string, branch: string) => {
    lines.push(prefix + branch + describe(i, snap.scanned));
    const under = prefix + (branch === '├── ' ? '│   ' : branch === '└── ' ? '    ' : '');
    for (const p of i.problems) {
      if (p.code === 'in-use') continue;
      lines.push(`${under}${i.children.length ? '│ ' : '  '}  ${p.code}: ${p.message}`);
    }
    for (const f of i.fixes) lines.push(`${under}${i.children.length ? '│ ' : '  '}  fix: ${commandLine(f.command)}`);
    i.children.forEach((c, k) => emit(byReal.get(c)!, under, k === i.children.length - 1 ? '└── ' : '├── '));
  };
  for (const r of snap.treeRoots) emit(byReal.get(r)!, '', '');
  const s = snap.summary;
  const counts = [
    `${s.images} image${s.images === 1 ? '' : 's'}`,
    `${s.bases} base${s.bases === 1 ? '' : 's'} (${s.sharedBases} shared)`,
    `${s.overlays} overlay${s.overlays === 1 ? '' : 's'}`,
    `${s.standalone} standalone`,
    `${s.withProblems} with problems`,
    `${s.inUse} in use`,
    `${sizeToStr(s.totalActualSize)} on disk`,
  ];
  lines.push('', counts.join(', '));
  for (const w of snap.warnings) lines.push(`warning: ${w}`);
  return lines.join('\n') + '\n';
}
