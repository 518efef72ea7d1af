// The library: every qcow2 and raw image under a set of folders (and files), each header read
// once, and the dependency graph built from them: chains from base to tops, bases shared by
// several overlays, standalone images, backing files outside the folders (followed read-only),
// who holds what, the problems found and their fixes. `rescan(paths)` re-reads only what
// changed; the graph is then rebuilt from the records, which costs no I/O but the few stats of
// backing names that point nowhere known.
import { readdirSync, realpathSync, type Dirent } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { combineBackingPath } from '../chain/open';
import { localPathOrNull } from '../chain/names';
import { fileKey, findHoldersOf, qemuLockedFiles } from '../io/lock-doctor';
import { candidateKind, isProtocolName, readRecord, statOrError, type Candidate } from './read-record';
import { buildGraph } from './graph';
import type { Holder, ImageRecord, LibrarySnapshot } from './types';

/** Folders deeper than this below a scanned folder are not walked (a guard, not a feature). */
const MAX_DEPTH = 16;
/** Entries handled between two turns of the event loop, so a scan never freezes a server. */
const YIELD_EVERY = 16;

/** Temporary files of Strata's own jobs (compaction), never shown as images. */
const OWN_TEMP = /\.strata-[a-z]+-[A-Za-z0-9]+$/;

export interface ScanOptions {
  /** Probe QEMU's lock bytes and name holders (default true). */
  holders?: boolean;
}

const turn = () => new Promise<void>((r) => setImmediate(r));

export class Library {
  /** By realPath. */
  private records = new Map<string, ImageRecord>();
  /** realPaths taken only because an image names them as its backing file (no walk would). */
  private viaBacking = new Set<string>();
  private warnings: string[] = [];
  private holders = new Map<string, Holder>();
  private readonly roots: string[];
  private snapshotCache: LibrarySnapshot | null = null;

  constructor(roots: string[], private readonly opts: ScanOptions = {}) {
    this.roots = [...new Set(roots.map((r) => resolve(r)))];
  }

  get scanned(): string[] { return [...this.roots]; }

  /** Walks every root from scratch. */
  async scan(): Promise<LibrarySnapshot> {
    this.records.clear();
    this.viaBacking.clear();
    this.warnings = [];
    let n = 0;
    for (const root of this.roots) n = await this.walk(root, 0, new Set(), n, true);
    await this.followBackingFiles();
    await this.refreshHolders();
    return this.snapshot();
  }

  /**
   * Re-reads `paths` (files created, changed or removed; folders walked again), then rebuilds
   * the graph. Equals a full scan of the same roots.
   */
  async rescan(paths: string[]): Promise<LibrarySnapshot> {
    const touched = paths.map((p) => resolve(p));
    // Forget what was under the touched paths, and whatever was taken only as a backing file:
    // those are followed again from the images that remain.
    for (const [key, rec] of this.records) {
      if (this.viaBacking.has(key) || touched.some((t) => rec.path === t || rec.path.startsWith(t + '/') || key === t || key.startsWith(t + '/'))) {
        this.records.delete(key);
      }
    }
    this.viaBacking.clear();
    this.warnings = this.warnings.filter((w) => !touched.some((t) => w.startsWith(t)));
    let n = 0;
    for (const t of touched) {
      if (!this.roots.some((r) => t === r || t.startsWith(r + '/'))) continue;
      const s = statOrError(t);
      if (!('st' in s)) continue;
      if (s.st.isDirectory()) n = await this.walk(t, this.depthOf(t), new Set(), n, false);
      else this.addFile(t, null, candidateKind(basename(t)), false);
    }
    await this.followBackingFiles();
    await this.refreshHolders();
    return this.snapshot();
  }

  /**
   * Re-reads who holds which image (QEMU's lock bytes); the records stay as they are, and the
   * graph is rebuilt only when a holder changed.
   */
  async refreshHolders(): Promise<LibrarySnapshot> {
    const holders = new Map<string, Holder>();
    if (this.opts.holders !== false) {
      const locked = await qemuLockedFiles();
      if (locked) {
        const keys = new Map<string, ImageRecord>();
        for (const rec of this.records.values()) {
          const k = fileKey(rec.dev, rec.ino);
          if (locked.has(k)) keys.set(k, rec);
        }
        if (keys.size) {
          const named = await findHoldersOf(new Set(keys.keys()));
          for (const [k, rec] of keys) {
            const h = named.get(k)?.[0];
            holders.set(rec.realPath, h ? { pid: h.pid, program: h.program, vm: h.vmName } : { pid: 0, program: 'another process', vm: null });
          }
        }
      }
    }
    const same = holders.size === this.holders.size &&
      [...holders].every(([k, h]) => { const o = this.holders.get(k); return o && o.pid === h.pid && o.program === h.program && o.vm === h.vm; });
    if (!same) {
      this.holders = holders;
      this.snapshotCache = null;
    }
    return this.snapshot();
  }

  /** The graph as it stands (rebuilt only after a change). */
  snapshot(): LibrarySnapshot {
    if (!this.snapshotCache) this.snapshotCache = buildGraph(this.roots, [...this.records.values()], this.holders, this.warnings);
    return this.snapshotCache;
  }

  private depthOf(path: string): number {
    const root = this.roots.filter((r) => path === r || path.startsWith(r + '/')).sort((a, b) => b.length - a.length)[0];
    return root ? path.slice(root.length).split('/').filter(Boolean).length : 0;
  }

  /**
   * Walks `dir` (or takes it as a file when it is one). `seen` holds the folders on the
   * current path by device and inode, so a symlink loop ends the walk instead of recursing.
   */
  private async walk(path: string, depth: number, seen: Set<string>, n: number, isRoot: boolean): Promise<number> {
    const s = statOrError(path);
    if (!('st' in s)) {
      this.warnings.push(`${path}: ${s.message}`);
      return n;
    }
    if (!s.st.isDirectory()) {
      // A file given by name is taken even without a known extension.
      if (s.st.isFile() || s.st.isBlockDevice()) this.addFile(path, null, isRoot ? 'qcow2-or-raw' : candidateKind(basename(path)), false);
      return n;
    }
    const id = `${s.st.dev}:${s.st.ino}`;
    if (seen.has(id) || depth > MAX_DEPTH) return n;
    seen.add(id);
    let entries: Dirent[];
    let realDir: string;
    try {
      entries = readdirSync(path, { withFileTypes: true });
      realDir = realpathSync.native(path);
    } catch (err) {
      this.warnings.push(`${path}: cannot list folder: ${(err as NodeJS.ErrnoException).code === 'EACCES' ? 'permission denied' : (err as Error).message}`);
      seen.delete(id);
      return n;
    }
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      if (++n % YIELD_EVERY === 0) await turn();
      const p = join(path, e.name);
      if (e.isDirectory()) {
        n = await this.walk(p, depth + 1, seen, n, false);
      } else if (e.isFile()) {
        // A plain entry of a folder whose real path is known: no realpath call of its own.
        if (!OWN_TEMP.test(e.name)) this.addFile(p, join(realDir, e.name), candidateKind(e.name), false);
      } else if (e.isSymbolicLink()) {
        const t = statOrError(p);
        if (!('st' in t)) continue; // dangling: not an image
        if (t.st.isDirectory()) n = await this.walk(p, depth + 1, seen, n, false);
        else if (t.st.isFile() && !OWN_TEMP.test(e.name)) this.addFile(p, null, candidateKind(e.name), false);
      }
      // FIFOs, sockets and devices found in a folder are not images: never opened.
    }
    seen.delete(id);
    return n;
  }

  private addFile(path: string, realPath: string | null, kind: Candidate, external: boolean): ImageRecord | null {
    let real = realPath;
    if (real === null) {
      try { real = realpathSync.native(path); } catch { return null; }
    }
    const have = this.records.get(real);
    if (have) {
      // Found again under another name (a symlink): the first name stays. A file first seen
      // only as someone's backing file becomes a scanned one when a walk reaches it.
      if (have.external && !external) have.external = false;
      return have;
    }
    const rec = readRecord(path, real, kind, external);
    if (rec) {
      this.records.set(real, rec);
      this.snapshotCache = null;
    }
    return rec;
  }

  /**
   * Backing files named by images but not found by the walk (outside the folders, or with an
   * extension the walk does not take as raw): read them too, following each chain to its end.
   */
  private async followBackingFiles(): Promise<void> {
    const queue = [...this.records.values()];
    // Most backing names name a file the walk found under that very name: no syscall for them.
    const byPath = new Set<string>();
    for (const r of this.records.values()) byPath.add(r.path);
    let n = 0;
    while (queue.length) {
      const rec = queue.pop()!;
      if (!rec.backingName || rec.error || isProtocolName(rec.backingName)) continue;
      if (++n % YIELD_EVERY === 0) await turn();
      const named = combineBackingPath(rec.path, rec.backingName);
      const target = localPathOrNull(named) ?? named;
      if (byPath.has(target)) continue;
      let real: string;
      try { real = realpathSync.native(target); } catch { continue; }
      if (this.records.has(real)) continue;
      // Outside the folders, or inside but skipped by the walk (a raw file without a raw
      // extension): an image after all, since another one names it.
      const inside = this.roots.some((r) => target === r || target.startsWith(r + '/'));
      const added = this.addFile(target, real, 'backing', !inside);
      if (added) {
        this.viaBacking.add(added.realPath);
        byPath.add(added.path);
        queue.push(added);
      }
    }
    this.snapshotCache = null;
  }
}

