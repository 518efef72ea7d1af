// The library service: the folders the user chose, scanned with the core library, watched
// (inotify through fs.watch, debounced, rescanning only what changed) so that an image made,
// removed or rebased by another tool shows up within a second; who holds what is refreshed
// every few seconds. Plain Node: tests run it without Electron.
import { watch, type FSWatcher } from 'node:fs';
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
  private watchers: FSWatcher[] = [];
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
  }

  /** Scans the folders and starts watching them. */
  async start(): Promise<LibrarySnapshot> {
    const snap = await this.serial(() => this.library.scan());
    this.holdersKey = holdersKey(snap);
    this.watchAll();
    const every = this.opts.holdersEveryMs ?? 2000;
    if (every > 0) {
      this.holdersTimer = setInterval(() => { void this.refreshHolders(); }, every);
      this.holdersTimer.unref();
    }
    this.emit(snap);
    return snap;
  }

  snapshot(): LibrarySnapshot { return this.library.snapshot(); }

  /** Replaces the folder list: a new scan of everything, new watchers. */
  async setFolders(folders: string[]): Promise<LibrarySnapshot> {
    this.folders = folders;
    this.unwatchAll();
    const snap = await this.serial(async () => {
      this.library = new Library(folders);
      return this.library.scan();
    });
    this.watchAll();
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
    for (const folder of this.folders) {
      try {
        const w = watch(folder, { recursive: true }, (_event, name) => {
          this.pending.add(name ? join(folder, name.toString()) : folder);
          this.schedule(this.debounceMs);
        });
        w.on('error', (err) => {
          // The folder went away, or inotify ran out of watches: rescan it whole later.
          this.opts.log?.(`watching ${folder} stopped: ${err.message}`);
          this.pending.add(folder);
          this.schedule(this.debounceMs);
        });
        this.watchers.push(w);
      } catch (err) {
        this.opts.log?.(`cannot watch ${folder}: ${(err as Error).message}`);
      }
    }
  }

  private unwatchAll(): void {
    for (const w of this.watchers) w.close();
    this.watchers = [];
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
