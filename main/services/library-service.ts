// The library service: the folders the user chose, scanned with the core library, watched
// (inotify through fs.watch, debounced, rescanning only what changed) so that an image made,
// removed or rebased by another tool shows up within a second; who holds what is refreshed
// every few seconds. Plain Node: tests run it without Electron.
import { readdirSync, realpathSync, statSync, watch, type Dirent, type FSWatcher } from 'node:fs';
import { join, resolve } from 'node:path';
import { Library } from '../../core/library/library';
import type { LibrarySnapshot } from '../../core/library/types';

export interface LibraryServiceOptions {
  /** Quiet time before changed paths are rescanned (ms). */
  debounceMs?: number;
  /** How often holders (QEMU's locks) are looked at again (ms); 0 = never. */
  holdersEveryMs?: number;
  log?: (line: string) => void;
}

export class LibraryService {
  private library: Library;
  /** One inotify watch per folder (by real path): events name the entries that changed. */
  private watchers = new Map<string, FSWatcher>();
  private pending = new Set<string>();
  private timer: NodeJS.Timeout | null = null;
  private holdersTimer: NodeJS.Timeout | null = null;
  private readonly listeners = new Set<(s: LibrarySnapshot) => void>();
  private work: Promise<unknown> = Promise.resolve();
  private holdersKey = '';
  private closed = false;
  private readonly debounceMs: number;

  constructor(private folders: string[], private readonly opts: LibraryServiceOptions = {}) {
    this.library = new Library(folders);
    this.debounceMs = opts.debounceMs ?? 150;
    const every = opts.holdersEveryMs ?? 2000;
    if (every > 0) {
      this.holdersTimer = setInterval(() => { void this.refreshHolders(); }, every);
      this.holdersTimer.unref();
    }
  }

  private first: Promise<LibrarySnapshot> | null = null;

  /**
   * The library as it stands, once the first scan and the scans and rescans already queued have
   * finished (not the first scan's snapshot: a page opened later must see what changed since).
   */
  async ready(): Promise<LibrarySnapshot> {
    await (this.first ?? this.start());
    await this.work;
    return this.library.snapshot();
  }

  /** Scans the folders and starts watching them. */
  start(): Promise<LibrarySnapshot> {
    this.first ??= this.startNow();
    return this.first;
  }

  private async startNow(): Promise<LibrarySnapshot> {
    // Watch first: a change while the scan runs is then rescanned after it, not lost.
    this.watchAll();
    const snap = await this.serial(() => this.library.scan());
    this.holdersKey = holdersKey(snap);
    this.emit(snap);
    return snap;
  }

  snapshot(): LibrarySnapshot { return this.library.snapshot(); }

  /** Replaces the folder list: a new scan of everything, new watchers. */
  async setFolders(folders: string[]): Promise<LibrarySnapshot> {
    this.folders = folders;
    this.unwatchAll();
    this.watchAll();
    const scanned = this.serial(async () => {
      this.library = new Library(folders);
      return this.library.scan();
    });
    this.first ??= scanned;
    const snap = await scanned;
    this.emit(snap);
    return snap;
  }

  /** A full rescan (the user's "Rescan" button). */
  async rescanAll(): Promise<LibrarySnapshot> {
    const snap = await this.serial(() => this.library.scan());
    this.emit(snap);
    return snap;
  }

  /** Paths a job just changed: rescanned at once instead of waiting for the watcher. */
  touched(paths: string[]): void {
    for (const p of paths) this.pending.add(resolve(p));
    this.schedule(0);
  }

  onChange(fn: (s: LibrarySnapshot) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.unwatchAll();
    if (this.timer) clearTimeout(this.timer);
    if (this.holdersTimer) clearInterval(this.holdersTimer);
    await this.work.catch(() => {});
  }

  /** Runs library work one at a time: scans and rescans never interleave. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.work.then(fn, fn);
    this.work = next.catch(() => {});
    return next;
  }

  private emit(snap: LibrarySnapshot): void {
    for (const l of this.listeners) {
      try { l(snap); } catch (err) { this.opts.log?.(`library listener failed: ${(err as Error).message}`); }
    }
  }

  private watchAll(): void {
    for (const folder of this.folders) this.watchDir(folder, 0);
  }

  /**
   * Watches `dir` and the folders below it, each with a plain (non-recursive) fs.watch: one
   * inotify watch per folder. (Node's recursive mode on Linux watches every file on its own,
   * 2,000 watchers and 100 ms for a folder of 2,000 images.)
   */
  private watchDir(dir: string, depth: number): void {
    if (this.closed || depth > 16) return;
    let real: string;
    try { real = realpathSync.native(dir); } catch { return; }
    if (this.watchers.has(real)) return;
    let w: FSWatcher;
    try {
      w = watch(dir, (_event, name) => this.changed(name ? join(dir, name.toString()) : dir, depth));
    } catch (err) {
      this.opts.log?.(`cannot watch ${dir}: ${(err as Error).message}`);
      return;
    }
    w.on('error', () => {
      // The folder went away (or inotify ran out of watches): rescan where it was.
      w.close();
      this.watchers.delete(real);
      this.changed(dir, depth);
    });
    this.watchers.set(real, w);
    let entries: Dirent[] = [];
    try { entries = readdirSync(dir, { withFileTypes: true }); } catch { /* unreadable: its rescan says so */ }
    for (const e of entries) if (e.isDirectory()) this.watchDir(join(dir, e.name), depth + 1);
  }

  /** Something changed at `path` (in a watched folder): rescan it soon; watch it if it is a new folder. */
  private changed(path: string, depth: number): void {
    this.pending.add(path);
    try { if (statSync(path).isDirectory()) this.watchDir(path, depth + 1); } catch { /* removed */ }
    this.schedule(this.debounceMs);
  }

  private unwatchAll(): void {
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
  }

  private schedule(ms: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      const paths = [...this.pending];
      this.pending.clear();
      if (!paths.length) return;
      void this.serial(() => this.library.rescan(paths)).then((snap) => {
        this.holdersKey = holdersKey(snap);
        this.emit(snap);
      }, (err) => this.opts.log?.(`rescan failed: ${(err as Error).message}`));
    }, ms);
  }

  private async refreshHolders(): Promise<void> {
    if (this.closed) return;
    const snap = await this.serial(() => this.library.refreshHolders());
    const key = holdersKey(snap);
    if (key !== this.holdersKey) {
      this.holdersKey = key;
      this.emit(snap);
    }
  }
}

function holdersKey(s: LibrarySnapshot): string {
  return s.images.filter((i) => i.inUse).map((i) => `${i.realPath}:${i.inUse!.pid}`).join('\n');
}
