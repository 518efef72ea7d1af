// From records to the graph: backing names resolved as QEMU resolves them, edges, loops, the
// problems of each image with their fixes, and the candidates for a moved backing file.
// Pure but for a stat of backing names that resolve to no known image (to tell missing from
// unreadable).
import { basename, dirname, relative } from 'node:path';
import { combineBackingPath } from '../chain/open';
import { localPathOrNull } from '../chain/names';
import { sizeToStr } from '../chain/size-str';
import { isProtocolName, statOrError } from './read-record';
import type { BackingCandidate, Fix, Holder, ImageRecord, LibraryImage, LibrarySnapshot, LibrarySummary } from './types';
import { realpathSync } from 'node:fs';

/**
 * A backing file modified more than this after its overlay was born is "changed": file
 * systems stamp both within the same second when a chain is created by a script.
 */
const CHANGED_SLACK_MS = 2000;

function holderText(h: Holder): string {
  return h.pid ? `PID ${h.pid} (${h.program}${h.vm ? `, VM '${h.vm}'` : ''})` : h.program;
}

function byPath(a: { path: string }, b: { path: string }): number {
  return a.path < b.path ? -1 : a.path > b.path ? 1 : 0;
}

/** The name to record for `target` as the backing file of `overlay`: relative when the old one was. */
export function backingNameFor(overlay: string, target: string, relativeLike: boolean): string {
  if (!relativeLike) return target;
  const rel = relative(dirname(overlay), target);
  return rel || basename(target);
}

export function buildGraph(scanned: string[], records: ImageRecord[], holders: Map<string, Holder>, warnings: string[]): LibrarySnapshot {
  const images = new Map<string, LibraryImage>();
  for (const r of [...records].sort(byPath)) {
    // Object.assign, not a spread: V8 copies records into fast objects this way (a spread
    // of 2,000 records took 100 ms, this 2-20).
    images.set(r.realPath, Object.assign({}, r, {
      backingPath: null, backingRelative: false, backing: null, children: [],
      inUse: holders.get(r.realPath) ?? null, problems: [], fixes: [], candidates: [],
    }));
  }
  // Backing names resolve to an image's name as found (no syscall), or are resolved once.
  const realOf = new Map<string, string | null>();
  for (const img of images.values()) realOf.set(img.path, img.realPath);
  const resolveReal = (p: string): string | null => {
    if (!realOf.has(p)) { let r: string | null; try { r = realpathSync.native(p); } catch { r = null; } realOf.set(p, r); }
    return realOf.get(p)!;
  };

  for (const img of images.values()) {
    if (img.error) img.problems.push({ code: img.error.code, message: img.error.message });
    if (img.corrupt) img.problems.push({ code: 'corrupt', message: 'marked corrupt by QEMU or Strata: it cannot be written until it is repaired' });
    if (img.dirty && !img.inUse) img.problems.push({ code: 'dirty', message: 'not closed cleanly (lazy refcounts): its refcounts must be repaired before it is written' });
    if (img.inUse) img.problems.push({ code: 'in-use', message: `in use by ${holderText(img.inUse)}: Strata will not write it` });
    if (!img.backingName) continue;
    if (isProtocolName(img.backingName)) {
      img.problems.push({ code: 'backing-unreadable', message: `backing file '${img.backingName}' is not a local file (a protocol Strata does not open)` });
      continue;
    }
    img.backingRelative = !img.backingName.startsWith('/');
    const named = combineBackingPath(img.path, img.backingName);
    img.backingPath = localPathOrNull(named) ?? named;
    const real = resolveReal(img.backingPath);
    const target = real ? images.get(real) : undefined;
    if (!target) {
      const s = statOrError(img.backingPath);
      if ('st' in s) img.problems.push({ code: 'backing-unreadable', message: `backing file ${img.backingPath} cannot be read as an image` });
      else if (s.code === 'ENOENT' || s.code === 'ENOTDIR') img.problems.push({ code: 'backing-missing', message: `backing file ${img.backingPath} does not exist (moved, renamed or deleted)` });
      else img.problems.push({ code: 'backing-unreadable', message: `backing file ${img.backingPath}: ${s.message}` });
      continue;
    }
    if (target.error) {
      img.problems.push({ code: 'backing-unreadable', message: `backing file ${target.path}: ${target.error.message}` });
      continue;
    }
    img.backing = target.realPath;
    if (img.format === 'qcow2' && !img.backingFormat) {
      img.problems.push({ code: 'backing-format-unspecified', message: `the backing file's format is not recorded, so QEMU guesses it (it is ${target.format} now); record it` });
    }
    if (img.birthtimeMs !== null && img.hasData !== false && target.mtimeMs > img.birthtimeMs + CHANGED_SLACK_MS) {
      img.problems.push({ code: 'backing-changed', message: `backing file ${target.path} was modified (${new Date(target.mtimeMs).toISOString()}) after this overlay was created (${new Date(img.birthtimeMs).toISOString()}): the overlay may no longer read as it did` });
    }
  }

  // Loops: following backing edges from an image comes back to it. Their members are cut
  // loose (drawn as roots with the problem) so every image still appears once in the tree.
  const state = new Map<string, 'active' | 'done'>();
  for (const start of images.values()) {
    const path: LibraryImage[] = [];
    let cur: LibraryImage | undefined = start;
    while (cur && !state.has(cur.realPath)) {
      state.set(cur.realPath, 'active');
      path.push(cur);
      cur = cur.backing ? images.get(cur.backing) : undefined;
    }
    if (cur && state.get(cur.realPath) === 'active') {
      const loop = path.slice(path.indexOf(cur));
      const names = loop.map((l) => basename(l.path)).join(' → ');
      for (const l of loop) {
        l.problems.push({ code: 'backing-loop', message: `backing files form a loop (${names} → ${basename(cur.path)})` });
      }
      for (const l of loop) l.backing = null;
    }
    for (const p of path) state.set(p.realPath, 'done');
  }

  for (const img of images.values()) {
    if (img.backing) images.get(img.backing)!.children.push(img.realPath);
  }
  for (const img of images.values()) img.children.sort((a, b) => byPath(images.get(a)!, images.get(b)!));

  for (const img of images.values()) {
    addFixes(img, images);
  }

  const all = [...images.values()];
  const treeRoots = all.filter((i) => !i.backing).map((i) => i.realPath);
  return { scanned, images: all, treeRoots, summary: summarize(all), warnings: [...warnings] };
}

function descendants(img: LibraryImage, images: Map<string, LibraryImage>): Set<string> {
  const out = new Set<string>();
  const stack = [...img.children];
  while (stack.length) {
    const c = stack.pop()!;
    if (out.has(c)) continue;
    out.add(c);
    stack.push(...images.get(c)!.children);
  }
  return out;
}

/** Files that could be the missing backing file: same name, or same size and format; best first. */
function candidatesFor(img: LibraryImage, images: Map<string, LibraryImage>): BackingCandidate[] {
  const wantName = basename(img.backingName!);
  const wantFormat = img.backingFormat === 'qcow2' || img.backingFormat === 'raw' ? img.backingFormat : null;
  const below = descendants(img, images);
  const scored: { c: BackingCandidate; score: number }[] = [];
  for (const other of images.values()) {
    if (other === img || other.error || !other.format || below.has(other.realPath)) continue;
    if (wantFormat && other.format !== wantFormat) continue;
    const sameName = basename(other.path) === wantName;
    const sameSize = other.virtualSize === img.virtualSize && other.virtualSize > 0;
    if (!sameName && !(sameSize && wantFormat)) continue;
    const reason = sameName && sameSize ? `same name and size (${sizeToStr(other.virtualSize)})` : sameName ? 'same name' : `same size (${sizeToStr(other.virtualSize)}) and format`;
    scored.push({ c: { path: other.path, format: other.format, virtualSize: other.virtualSize, reason }, score: (sameName ? 2 : 0) + (sameSize ? 1 : 0) });
  }
  scored.sort((a, b) => b.score - a.score || byPath(a.c, b.c));
  return scored.map((s) => s.c);
}

function rebaseFix(img: LibraryImage, problem: Fix['problem'], target: string, format: 'qcow2' | 'raw', description: string): Fix {
  const name = target;
  return {
    problem, description,
    command: ['strata', 'rebase', '-u', '-b', name, '-F', format, img.path],
    job: { op: 'rebase', image: img.path, backing: name, backingFormat: format, unsafe: true },
  };
}

function addFixes(img: LibraryImage, images: Map<string, LibraryImage>): void {
  for (const p of img.problems) {
    switch (p.code) {
      case 'backing-missing': {
        img.candidates = candidatesFor(img, images);
        for (const c of img.candidates.slice(0, 3)) {
          const name = backingNameFor(img.path, c.path, img.backingRelative);
          img.fixes.push(rebaseFix(img, p.code, name, c.format, `point it at ${c.path} (${c.reason}); its data is not copied or changed`));
        }
        break;
      }
      case 'backing-format-unspecified': {
        const target = images.get(img.backing!)!;
        img.fixes.push(rebaseFix(img, p.code, img.backingName!, target.format!, `record the backing format (${target.format}) so that it is never guessed`));
        break;
      }
      case 'dirty':
      case 'corrupt':
        if (!img.inUse) {
          img.fixes.push({
            problem: p.code, description: 'check the image and repair its refcounts',
            command: ['strata', 'check', '-r', 'all', img.path], job: { op: 'check', image: img.path, repair: 'all' },
          });
        }
        break;
      case 'backing-loop': case 'backing-unreadable': case 'backing-changed': case 'damaged':
      case 'in-use': case 'unreadable':
        // No command fixes these safely: the message says what to look at.
        break;
      default: { const never: never = p.code; return never; }
    }
  }
}

function summarize(all: LibraryImage[]): LibrarySummary {
  const s: LibrarySummary = { images: all.length, bases: 0, sharedBases: 0, overlays: 0, standalone: 0, withProblems: 0, inUse: 0, totalActualSize: 0 };
  for (const i of all) {
    if (i.backingName) s.overlays++;
    else if (i.children.length) s.bases++;
    else s.standalone++;
    if (i.children.length > 1) s.sharedBases++;
    if (i.problems.length) s.withProblems++;
    if (i.inUse) s.inUse++;
    s.totalActualSize += i.actualSize;
  }
  return s;
}
