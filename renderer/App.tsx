// The window: folders and filters on the left, the chains in the middle, the selected image's
// details on the right, the job monitor below, dialogs and notifications above.
import { lazy, Suspense, useEffect, useState } from 'react';
import { Sidebar } from './features/library/Sidebar';
import { ChainForest } from './features/library/ChainForest';
import { AddFolderDialog, EmptyLibrary } from './features/library/AddFolder';
import { DetailsPanel } from './features/details/DetailsPanel';
// Loaded when first opened: the first screen (the chains) needs none of them.
const JobMonitor = lazy(() => import('./features/jobs/JobMonitor').then((m) => ({ default: m.JobMonitor })));
const Wizard = lazy(() => import('./features/wizards/Wizard').then((m) => ({ default: m.Wizard })));
const FixDialog = lazy(() => import('./features/wizards/FixDialog').then((m) => ({ default: m.FixDialog })));
import { Toasts } from './components/toasts';
import { Spinner } from './components/ui';
import { useStore } from './lib/store';
import type { Filter } from './features/library/model';

/** Applies the theme setting: the system's preference, or light or dark. */
function useTheme(): void {
  const theme = useStore((s) => s.settings?.theme ?? 'system');
  useEffect(() => {
    const mq = window.matchMedia('(prefers-color-scheme: dark)');
    const apply = () => document.documentElement.classList.toggle('dark', theme === 'dark' || (theme === 'system' && mq.matches));
    apply();
    mq.addEventListener('change', apply);
    return () => mq.removeEventListener('change', apply);
  }, [theme]);
}

export function App() {
  useTheme();
  const [filter, setFilter] = useState<Filter>({ text: '', problem: '' });
  const connection = useStore((s) => s.connection);
  const library = useStore((s) => s.library);
  const settings = useStore((s) => s.settings);
  const loadError = useStore((s) => s.loadError);
  const dialog = useStore((s) => s.dialog);
  const jobsOpen = useStore((s) => s.jobsOpen);
  const empty = settings && settings.folders.length === 0 && library && library.images.length === 0;

  return (
    <div className="flex h-full">
      <Sidebar filter={filter} onFilter={setFilter} />
      <main className="flex min-w-0 flex-1 flex-col" aria-label="Chains">
        {connection === 'closed' && (
          <div role="alert" className="bg-amber-100 px-4 py-2 text-sm text-amber-900 dark:bg-amber-900 dark:text-amber-100">The connection to Strata was lost; reconnecting…</div>
        )}
        {loadError && <div role="alert" className="bg-red-100 px-4 py-2 text-sm text-red-900 dark:bg-red-950 dark:text-red-100">{loadError}</div>}
        <div className="flex min-h-0 flex-1">
          <div className="min-w-0 flex-1">
            {!library && !loadError && <div className="flex h-full items-center justify-center gap-2 text-sm text-slate-500 dark:text-slate-400"><Spinner /> Scanning your folders…</div>}
            {library && (empty ? <EmptyLibrary /> : <ChainForest filter={filter} />)}
          </div>
          <DetailsPanel />
        </div>
        {jobsOpen && <Suspense fallback={<section id="job-monitor" aria-label="Jobs" aria-busy="true" className="h-80 shrink-0 border-t border-slate-200 dark:border-slate-800" />}><JobMonitor /></Suspense>}
      </main>
      <Suspense fallback={null}>
        {dialog?.kind === 'wizard' && <Wizard key={`${dialog.op}:${dialog.image}:${dialog.snapshot ?? ''}`} op={dialog.op} imagePath={dialog.image} snapshot={dialog.snapshot} />}
        {dialog?.kind === 'fix' && <FixDialog imagePath={dialog.image} problem={dialog.problem} />}
      </Suspense>
      {dialog?.kind === 'add-folder' && <AddFolderDialog />}
      <Toasts />
    </div>
  );
}
