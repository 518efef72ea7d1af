// The renderer's state: what the main process told it (app, settings, library, jobs) and what
// the person is doing (selection, filters, open dialog, toasts). One store, read with
// useStore(selector); it changes only through the protocol's events and the actions below.
import { useSyncExternalStore } from 'react';
import type { JobRecord, ProgressMessage } from '../../core/protocol/jobs';
import type { LibrarySnapshot } from '../../core/library/types';
import type { Settings } from '../../core/protocol/library';
import type { Result } from '../../core/protocol/rpc';
import { Client, ProtocolError, type ConnectionState } from './client';

export type AppInfo = Result<'app.info'>;
export type LibraryImage = LibrarySnapshot['images'][number];

export interface Toast {
  id: number;
  kind: 'success' | 'error' | 'info';
  title: string;
  body: string;
}

/** Progress samples of a running job, for its throughput chart and ETA. */
export interface Sample { t: number; bytes: number }

/** Operations the wizards offer, by the job they run. */
export type WizardOp = 'compact' | 'commit' | 'empty' | 'merge' | 'rebase' | 'check' | 'convert' | 'resize' | 'mirror' | 'snapshot-create' | 'snapshot-apply' | 'snapshot-delete';

export type DialogState =
  | { kind: 'wizard'; op: WizardOp; image: string; snapshot?: string }
  | { kind: 'fix'; image: string; problem: string }
  | { kind: 'add-folder' };

export interface State {
  dialog: DialogState | null;
  /** The job monitor panel is open. */
  jobsOpen: boolean;
  connection: ConnectionState;
  app: AppInfo | null;
  settings: Settings | null;
  library: LibrarySnapshot | null;
  jobs: JobRecord[];
  /** Progress of running jobs, apart from their records: an update re-renders only its own job. */
  progress: Record<string, ProgressMessage>;
  samples: Record<string, Sample[]>;
  selected: string | null;
  toasts: Toast[];
  loadError: string | null;
}

const initial: State = { dialog: null, jobsOpen: false, connection: 'connecting', app: null, settings: null, library: null, jobs: [], progress: {}, samples: {}, selected: null, toasts: [], loadError: null };

let state: State = initial;
const listeners = new Set<() => void>();

function set(patch: Partial<State> | ((s: State) => Partial<State>)): void {
  const p = typeof patch === 'function' ? patch(state) : patch; // before the copy: patch may set() too
  state = { ...state, ...p };
  for (const l of listeners) l();
}

export function getState(): State { return state; }

export function useStore<T>(select: (s: State) => T): T {
  return useSyncExternalStore((l) => { listeners.add(l); return () => listeners.delete(l); }, () => select(state));
}

export const client = new Client();

let toastSeq = 0;
export function toast(kind: Toast['kind'], title: string, body = ''): void {
  const t = { id: ++toastSeq, kind, title, body };
  set((s) => ({ toasts: [...s.toasts, t].slice(-4) }));
  setTimeout(() => dismissToast(t.id), kind === 'error' ? 12_000 : 6_000);
}

export function dismissToast(id: number): void {
  set((s) => ({ toasts: s.toasts.filter((t) => t.id !== id) }));
}

export function errorText(err: unknown): string {
  return err instanceof ProtocolError || err instanceof Error ? err.message : String(err);
}

const ACTIVE = new Set(['queued', 'running', 'cancelling']);

function upsertJob(r: JobRecord): void {
  const before = state.jobs.find((j) => j.id === r.id);
  set((s) => ({ jobs: [r, ...s.jobs.filter((j) => j.id !== r.id)].sort(jobOrder) }));
  // A job this page saw running ended, or one it has not seen yet (a job that ends before its
  // first record arrives, like a rename-only rebase) is already over: either way, say so.
  if ((!before || ACTIVE.has(before.state)) && !ACTIVE.has(r.state)) announce(r);
}

/** Running and queued first (oldest first), then finished ones (newest first). */
function jobOrder(a: JobRecord, b: JobRecord): number {
  const aa = ACTIVE.has(a.state) ? 0 : 1;
  const bb = ACTIVE.has(b.state) ? 0 : 1;
  if (aa !== bb) return aa - bb;
  return aa === 0 ? a.queuedAt - b.queuedAt : (b.endedAt ?? 0) - (a.endedAt ?? 0);
}

/** A job ended: a toast in the page (Electron also shows a desktop notification). */
function announce(r: JobRecord): void {
  // The end replaces the "started" toast of the same job.
  set((s) => ({ toasts: s.toasts.filter((t) => t.title !== `${r.title}: started`) }));
  if (r.state === 'succeeded') toast('success', `${r.title}: done`, r.summary ?? '');
  else if (r.state === 'failed') toast('error', `${r.title}: failed`, r.error?.message ?? '');
  else if (r.state === 'cancelled') toast('info', `${r.title}: cancelled`, 'The images are as they were, or consistent where the job had reached.');
}

function addSample(id: string, p: ProgressMessage): void {
  set((s) => {
    const list = [...(s.samples[id] ?? []), { t: p.elapsedMs, bytes: p.bytesDone }].slice(-600);
    return { samples: { ...s.samples, [id]: list }, progress: { ...s.progress, [id]: p } };
  });
}

export async function init(): Promise<void> {
  client.onState((c) => {
    set({ connection: c });
    if (c === 'open' && state.app) void reload();
  });
  client.on('library', (library) => set({ library }));
  client.on('job', upsertJob);
  client.on('progress', ({ id, progress }) => addSample(id, progress));
  client.on('settings', (settings) => set({ settings }));
  await reload();
}

async function reload(): Promise<void> {
  try {
    const [app, settings, library, jobs] = await Promise.all([
      client.request('app.info', {}), client.request('settings.get', {}), client.request('library.get', {}), client.request('jobs.list', {}),
    ]);
    set({ app, settings, library, jobs: [...jobs].sort(jobOrder), loadError: null });
  } catch (err) {
    set({ loadError: errorText(err) });
  }
}

export function select(realPath: string | null): void {
  set({ selected: realPath });
}

export function setSettings(settings: Settings): void {
  set({ settings });
}

export function openDialog(dialog: DialogState | null): void {
  set({ dialog });
}

export function setJobsOpen(jobsOpen: boolean): void {
  set({ jobsOpen });
}

export function setJobs(jobs: JobRecord[]): void {
  set({ jobs: [...jobs].sort(jobOrder) });
}
