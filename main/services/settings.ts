// Settings: folders, concurrency and theme, persisted as JSON in the user's data folder. A
// file that cannot be read or does not validate is set aside (renamed) and defaults are used:
// a broken settings file must never keep the app from starting.
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { SettingsSchema, type Settings } from '../../core/protocol/library';
import { describeIssues } from '../../core/protocol/rpc';

export const DEFAULT_SETTINGS: Settings = { folders: [], concurrency: 2, theme: 'system', onboarded: false };

/** Where Strata keeps its settings and job history: $XDG_CONFIG_HOME/strata (or ~/.config/strata). */
export function defaultDataDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.STRATA_DATA_DIR) return resolve(env.STRATA_DATA_DIR);
  const base = env.XDG_CONFIG_HOME || join(homedir(), '.config');
  return join(base, 'strata');
}

/** The usual folders of libvirt and GNOME Boxes that exist here: what first run proposes. */
export function suggestedFolders(home = homedir()): string[] {
  return ['/var/lib/libvirt/images', join(home, '.local/share/libvirt/images'), join(home, '.local/share/gnome-boxes/images')].filter((d) => existsSync(d));
}

/** Writes a file so that a crash leaves the old or the new version, never half of one. */
export function writeFileAtomic(path: string, text: string): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, text);
  renameSync(tmp, path);
}

export class SettingsStore {
  private current: Settings;
  private readonly file: string;
  private readonly listeners = new Set<(s: Settings) => void>();
  /** A problem met while loading (shown once in the log), or null. */
  readonly loadProblem: string | null = null;

  constructor(readonly dataDir: string) {
    this.file = join(dataDir, 'settings.json');
    let loaded: Settings = { ...DEFAULT_SETTINGS };
    if (existsSync(this.file)) {
      try {
        const parsed = SettingsSchema.safeParse({ ...DEFAULT_SETTINGS, ...JSON.parse(readFileSync(this.file, 'utf8')) });
        if (parsed.success) loaded = parsed.data;
        else this.loadProblem = `${this.file}: ${describeIssues(parsed.error)}; using defaults`;
      } catch (err) {
        this.loadProblem = `${this.file}: ${(err as Error).message}; using defaults`;
      }
      if (this.loadProblem) {
        try { renameSync(this.file, `${this.file}.broken-${Date.now()}`); } catch { /* keep going with defaults */ }
      }
    }
    this.current = loaded;
  }

  get(): Settings { return structuredClone(this.current); }

  update(patch: Partial<Settings>): Settings {
    const next = SettingsSchema.parse({ ...this.current, ...patch });
    next.folders = [...new Set(next.folders.map((f) => resolve(f)))];
    this.current = next;
    writeFileAtomic(this.file, JSON.stringify(next, null, 2) + '\n');
    for (const l of this.listeners) l(this.get());
    return this.get();
  }

  onChange(fn: (s: Settings) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
}
