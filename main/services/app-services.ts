// The services behind the window (Electron or browser mode): settings, library, jobs, and the
// handlers of every protocol method. Plain Node; the transports (Electron IPC, WebSocket) only
// move validated messages in and out (see rpc.ts).
import { closeSync, openSync, readSync, readdirSync, realpathSync, statSync } from 'node:fs';
import { homedir, platform } from 'node:os';
import { dirname, extname, join, resolve } from 'node:path';
import { imageInfo, type ImageInfo } from '../../core/chain/info';
import { openImageFile, openBackingChain, chainOf as imageChain, closeChain } from '../../core/chain/open';
import { UsageError, StrataError } from '../../core/errors';
import { nativeStatus } from '../../core/io/native';
import { isQcow2Magic } from '../../core/format/header';
import type { EventData, EventName, Method, Params, Result } from '../../core/protocol/rpc';
import { MapSummarySchema } from '../../core/protocol/library';
import { createDemoLibrary } from './demo';
import { JobManager } from './job-manager';
import type { JobHost } from './job-host';
import { LibraryService } from './library-service';
import { SettingsStore, suggestedFolders } from './settings';

export const VERSION = '0.1.0';

export interface AppServicesOptions {
  dataDir: string;
  mode: 'electron' | 'browser';
  host: JobHost;
  /** Folders given on the command line (`strata serve --folder`): scanned instead of the saved ones. */
  folders?: string[];
  /** Start with a freshly made sample library (`--demo`). */
  demo?: boolean;
  log?: (line: string) => void;
  /** Passed to the library service (tests use short intervals). */
  libraryOptions?: { debounceMs?: number; holdersEveryMs?: number };
}

type Handler<M extends Method> = (params: Params<M>) => Promise<Result<M>> | Result<M>;
type Handlers = { [M in Method]: Handler<M> };

export class AppServices {
  readonly settings: SettingsStore;
  readonly library: LibraryService;
  readonly jobs: JobManager;
  private readonly listeners = new Set<<E extends EventName>(event: E, data: EventData<E>) => void>();
  readonly handlers: Handlers;
  private readonly log: (line: string) => void;
  /** Folders scanned this session: the saved ones, or those given on the command line. */
  private folders: string[];
  private readonly sessionFolders: boolean;

  private constructor(private readonly opts: AppServicesOptions) {
    this.log = opts.log ?? (() => {});
    this.settings = new SettingsStore(opts.dataDir);
    if (this.settings.loadProblem) this.log(this.settings.loadProblem);
    this.sessionFolders = !!opts.folders?.length;
    this.folders = this.sessionFolders ? opts.folders!.map((f) => resolve(f)) : this.settings.get().folders;
    this.library = new LibraryService(this.folders, { ...opts.libraryOptions, log: this.log });
    this.jobs = new JobManager(opts.host, {
      dataDir: opts.dataDir,
      concurrency: this.settings.get().concurrency,
      chainOf: (p) => this.chainPaths(p),
      log: this.log,
      touched: (paths) => this.library.touched(paths),
      deferSpare: true,
    });
    this.library.onChange((s) => this.emit('library', s));
    this.jobs.on({ job: (r) => this.emit('job', r), progress: (id, progress) => this.emit('progress', { id, progress }) });
    this.settings.onChange((s) => this.emit('settings', s));
    this.handlers = this.makeHandlers();
  }

  static async create(opts: AppServicesOptions): Promise<AppServices> {
    const s = new AppServices(opts);
    if (opts.demo) {
      const dir = await createDemoLibrary();
      s.log(`sample library created in ${dir}`);
      s.folders = [...s.folders, dir];
      if (!s.sessionFolders) s.settings.update({ folders: s.folders, onboarded: true });
      await s.library.setFolders(s.folders);
    } else {
      // The first scan runs while the server starts and the page loads; library.get waits for it.
      void s.library.start();
    }
    // The spare job process starts once the library is there and the page has had a moment to
    // draw it: until then it would compete with both for the CPU.
    void s.library.ready().catch(() => {}).then(() => {
      setTimeout(() => { void s.jobs.warm().catch(() => {}); }, 1000).unref();
    });
    return s;
  }

  on(fn: <E extends EventName>(event: E, data: EventData<E>) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  async close(): Promise<void> {
    await this.jobs.shutdown();
    await this.library.close();
  }

  private emit<E extends EventName>(event: E, data: EventData<E>): void {
    for (const l of this.listeners) {
      try { l(event, data); } catch (err) { this.log(`event listener failed: ${(err as Error).message}`); }
    }
  }

  /** The realpaths of the chain under `path` (itself first), from the library when it knows it. */
  private chainPaths(path: string): string[] {
    let real: string;
    try { real = realpathSync.native(path); } catch { return [resolve(path)]; }
    const snap = this.library.snapshot();
    const byReal = new Map(snap.images.map((i) => [i.realPath, i]));
    const out: string[] = [real];
    for (let cur = byReal.get(real); cur?.backing && !out.includes(cur.backing); cur = byReal.get(cur.backing)) out.push(cur.backing);
    return out;
  }

  private async setFolders(folders: string[]): Promise<void> {
    this.folders = folders;
    await this.library.setFolders(folders);
  }

  private makeHandlers(): Handlers {
    return {
      'app.info': () => ({
        version: VERSION,
        mode: this.opts.mode,
        platform: platform(),
        native: (() => { const n = nativeStatus(); return { available: n.available, reason: n.reason ?? null }; })(),
        dataDir: this.opts.dataDir,
        home: homedir(),
        suggestedFolders: suggestedFolders(),
      }),
      'library.get': () => this.library.ready(),
      'library.rescan': () => this.library.rescanAll(),
      'library.addFolder': async ({ path }) => {
        const dir = resolve(path);
        let st;
        try { st = statSync(dir); } catch { throw new UsageError(`${dir}: no such folder`); }
        if (!st.isDirectory()) throw new UsageError(`${dir}: not a folder`);
        if (!this.folders.includes(dir)) await this.setFolders([...this.folders, dir]);
        return this.sessionFolders ? { ...this.settings.get(), folders: this.folders } : this.settings.update({ folders: this.folders, onboarded: true });
      },
      'library.removeFolder': async ({ path }) => {
        const dir = resolve(path);
        await this.setFolders(this.folders.filter((f) => f !== dir));
        return this.sessionFolders ? { ...this.settings.get(), folders: this.folders } : this.settings.update({ folders: this.folders });
      },
      'library.createDemo': async () => {
        const dir = await createDemoLibrary();
        this.log(`sample library created in ${dir}`);
        await this.setFolders([...this.folders, dir]);
        return this.sessionFolders ? { ...this.settings.get(), folders: this.folders } : this.settings.update({ folders: this.folders, onboarded: true });
      },
      'image.details': ({ path }) => imageDetails(path),
      'image.mapSummary': async ({ path, buckets }) => MapSummarySchema.parse(await this.jobs.read({ op: 'map-summary', image: path, buckets })),
      'fs.list': ({ path }) => listFolder(path),
      'jobs.plan': ({ spec }) => this.jobs.plan(spec),
      'jobs.start': ({ spec, force }) => this.jobs.start(spec, force),
      'jobs.cancel': ({ id }) => this.jobs.cancel(id),
      'jobs.list': () => this.jobs.list(),
      'jobs.clearHistory': () => this.jobs.clearHistory(),
      'settings.get': () => ({ ...this.settings.get(), folders: this.folders }),
      'settings.update': (patch) => {
        const s = this.settings.update(patch);
        if (patch.concurrency) this.jobs.setConcurrency(patch.concurrency);
        return { ...s, folders: this.folders };
      },
    };
  }
}

/** info as the details view takes it: an NBD backing image has no disk size (shown as 0). */
function detailsInfo(i: ImageInfo): ImageInfo & { 'actual-size': number; 'dirty-flag': boolean } {
  return { ...i, 'actual-size': i['actual-size'] ?? 0, 'dirty-flag': i['dirty-flag'] ?? false };
}

/** What the details view shows: `info` of the image and of each image of its chain. */
export async function imageDetails(path: string): Promise<Result<'image.details'>> {
  const top = await openImageFile(path, { lock: 'none' });
  try {
    const info = detailsInfo(await imageInfo(top));
    let chainError: string | null = null;
    try {
      await openBackingChain(top, 'none');
    } catch (err) {
      chainError = err instanceof StrataError ? err.message : String(err);
    }
    const chain = [];
    for (const img of imageChain(top).slice(1)) chain.push(detailsInfo(await imageInfo(img)));
    return { info, chain, chainError };
  } finally {
    await closeChain(top);
  }
}

const IMAGE_EXTENSIONS = new Set(['.qcow2', '.qcow', '.img', '.raw']);
const MAX_ENTRIES = 5000;

/** One folder's entries for the file and folder pickers of browser mode (no Electron dialogs there). */
export function listFolder(path: string): Result<'fs.list'> {
  const dir = resolve(path);
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new UsageError(`${dir}: ${code === 'ENOENT' ? 'no such folder' : code === 'ENOTDIR' ? 'not a folder' : code === 'EACCES' ? 'permission denied' : (err as Error).message}`);
  }
  names.sort((a, b) => a.localeCompare(b));
  const entries = [];
  for (const name of names.slice(0, MAX_ENTRIES)) {
    if (name.startsWith('.')) continue;
    const p = join(dir, name);
    let st;
    try { st = statSync(p); } catch { continue; }
    const kind = st.isDirectory() ? 'dir' as const : st.isFile() ? 'file' as const : 'other' as const;
    let image = false;
    if (kind === 'file') image = IMAGE_EXTENSIONS.has(extname(name).toLowerCase()) || hasQcow2Magic(p);
    entries.push({ name, path: p, kind, size: st.size, image });
  }
  entries.sort((a, b) => (a.kind === 'dir' ? 0 : 1) - (b.kind === 'dir' ? 0 : 1));
  return { path: dir, parent: dir === '/' ? null : dirname(dir), entries };
}

function hasQcow2Magic(p: string): boolean {
  let fd: number | null = null;
  try {
    fd = openSync(p, 'r');
    const b = Buffer.alloc(4);
    readSync(fd, b, 0, 4, 0);
    return isQcow2Magic(b);
  } catch {
    return false;
  } finally {
    if (fd !== null) closeSync(fd);
  }
}
