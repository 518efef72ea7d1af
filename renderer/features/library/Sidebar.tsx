// The sidebar: the folders Strata watches (add, remove, rescan), the filter, what the library
// holds in numbers, and the way to the job monitor and the theme.
import { useState } from 'react';
import { Badge, Button, Icon } from '../../components/ui';
import { client, errorText, openDialog, setJobsOpen, setSettings, toast, useStore } from '../../lib/store';
import { baseName, size } from '../../lib/format';
import { problemLabel } from './badges';
import type { Filter } from './model';
import { PROBLEM_CODES } from '../../../core/library/types';

export function Sidebar({ filter, onFilter }: { filter: Filter; onFilter: (f: Filter) => void }) {
  const settings = useStore((s) => s.settings);
  const library = useStore((s) => s.library);
  const active = useStore((s) => s.jobs.filter((j) => j.state === 'running' || j.state === 'queued' || j.state === 'cancelling').length);
  const jobsOpen = useStore((s) => s.jobsOpen);
  const [busy, setBusy] = useState(false);
  const s = library?.summary;

  const rescan = async () => {
    setBusy(true);
    try { await client.request('library.rescan', {}); } catch (err) { toast('error', 'Rescan failed', errorText(err)); } finally { setBusy(false); }
  };
  const remove = async (path: string) => {
    try { setSettings(await client.request('library.removeFolder', { path })); } catch (err) { toast('error', 'Could not remove the folder', errorText(err)); }
  };
  const theme = settings?.theme ?? 'system';
  const nextTheme = theme === 'system' ? 'light' : theme === 'light' ? 'dark' : 'system';
  const setTheme = async () => {
    try { setSettings(await client.request('settings.update', { theme: nextTheme })); } catch (err) { toast('error', 'Could not change the theme', errorText(err)); }
  };
  const present = new Set(library?.images.flatMap((i) => i.problems.map((p) => p.code)) ?? []);

  return (
    <nav aria-label="Library" className="flex h-full w-64 shrink-0 flex-col border-r border-slate-200 bg-slate-50 dark:border-slate-800 dark:bg-slate-900/60">
      <div className="flex items-center gap-2 px-4 pt-4 pb-3">
        <img src="./icon.svg" alt="" className="h-6 w-6" />
        <span className="text-lg font-semibold tracking-tight">Strata</span>
      </div>

      <section aria-labelledby="folders-h" className="px-3">
        <div className="flex items-center justify-between px-1">
          <h2 id="folders-h" className="text-xs font-semibold uppercase tracking-wide text-slate-500 dark:text-slate-400">Folders</h2>
          <div className="flex gap-0.5">
            <Button variant="ghost" small onClick={rescan} disabled={busy} aria-label="Rescan folders" title="Rescan folders"><Icon name="refresh" /></Button>
            <Button variant="ghost" small onClick={() => openDialog({ kind: 'add-folder' })} aria-label="Add folder" title="Add folder"><Icon name="plus" /></Button>
          </div>
        </div>
        <ul className="mt-1 space-y-0.5">
          {settings?.folders.map((f) => (
            <li key={f} className="group flex items-center gap-2 rounded-md px-1 py-1 text-sm hover:bg-slate-200/60 dark:hover:bg-slate-800">
              <Icon name="folder" className="h-4 w-4 text-slate-500 dark:text-slate-400" />
              <span className="min-w-0 flex-1 truncate" title={f}>{baseName(f) || f}</span>
              <button type="button" onClick={() => remove(f)} aria-label={`Stop watching ${f}`} title="Remove from the library (no file is deleted)"
                className="rounded p-0.5 text-slate-400 opacity-0 hover:text-red-600 focus:opacity-100 group-hover:opacity-100">
                <Icon name="x" className="h-3.5 w-3.5" />
              </button>
            </li>
          ))}
          {settings && settings.folders.length === 0 && <li className="px-1 py-1 text-sm text-slate-500 dark:text-slate-400">No folders yet.</li>}
        </ul>
      </section>

      <section aria-labelledby="filter-h" className="mt-5 px-4">
        <h2 id="filter-h" className="text-xs font-semibold uppercase tracking-wide text-slate-500 dark:text-slate-400">Find</h2>
        <label className="relative mt-2 block">
          <span className="sr-only">Filter images by name</span>
          <Icon name="search" className="pointer-events-none absolute top-2 left-2 h-4 w-4 text-slate-400" />
          <input type="search" value={filter.text} onChange={(e) => onFilter({ ...filter, text: e.target.value })} placeholder="Image name…"
            className="w-full rounded-md border border-slate-300 bg-white py-1.5 pr-2 pl-8 text-sm placeholder:text-slate-400 dark:border-slate-600 dark:bg-slate-800" />
        </label>
        <label className="mt-2 block text-sm">
          <span className="sr-only">Show</span>
          <select value={filter.problem} onChange={(e) => onFilter({ ...filter, problem: e.target.value })}
            className="w-full rounded-md border border-slate-300 bg-white px-2 py-1.5 text-sm dark:border-slate-600 dark:bg-slate-800">
            <option value="">All images</option>
            <option value="problems">Images with problems</option>
            {PROBLEM_CODES.filter((c) => present.has(c)).map((c) => <option key={c} value={c}>{c === 'in-use' ? 'In use' : `Problem: ${problemLabel(c)}`}</option>)}
          </select>
        </label>
      </section>

      {s && (
        <section aria-label="Summary" className="mt-5 px-4 text-sm text-slate-600 dark:text-slate-300">
          <dl className="grid grid-cols-[1fr_auto] gap-y-0.5 tabular-nums">
            <dt>Images</dt><dd>{s.images}</dd>
            <dt>Chains (bases)</dt><dd>{s.bases}</dd>
            <dt>Shared bases</dt><dd>{s.sharedBases}</dd>
            <dt>With problems</dt><dd>{s.withProblems ? <Badge tone="danger">{s.withProblems}</Badge> : 0}</dd>
            <dt>In use</dt><dd>{s.inUse}</dd>
            <dt>On disk</dt><dd>{size(s.totalActualSize)}</dd>
          </dl>
        </section>
      )}

      <div className="mt-auto space-y-1 border-t border-slate-200 p-3 dark:border-slate-800">
        <Button variant={jobsOpen ? 'primary' : 'ghost'} className="w-full justify-between" onClick={() => setJobsOpen(!jobsOpen)} aria-expanded={jobsOpen} aria-controls={jobsOpen ? 'job-monitor' : undefined}>
          <span className="flex items-center gap-2"><Icon name="jobs" /> Jobs</span>
          <span className="tabular-nums">{active ? `${active} active` : ''}</span>
        </Button>
        <Button variant="ghost" className="w-full justify-start" onClick={setTheme} aria-label={`Theme: ${theme}. Switch to ${nextTheme}`}>
          <Icon name={theme === 'dark' ? 'moon' : 'sun'} /> Theme: {theme}
        </Button>
      </div>
    </nav>
  );
}
