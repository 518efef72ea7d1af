// In-page notifications (a job ended, an action failed), announced to screen readers.
import { dismissToast, useStore } from '../lib/store';
import { Icon } from './ui';

export function Toasts() {
  const toasts = useStore((s) => s.toasts);
  return (
    <div aria-live="polite" data-testid="toasts" className="pointer-events-none fixed right-4 bottom-4 z-50 flex w-96 flex-col gap-2">
      {toasts.map((t) => (
        <div key={t.id} role={t.kind === 'error' ? 'alert' : 'status'} data-testid="toast"
          className={`pointer-events-auto rounded-lg border p-3 text-sm shadow-lg ${t.kind === 'error' ? 'border-red-300 bg-red-50 text-red-900 dark:border-red-800 dark:bg-red-950 dark:text-red-100' : t.kind === 'success' ? 'border-emerald-300 bg-emerald-50 text-emerald-900 dark:border-emerald-800 dark:bg-emerald-950 dark:text-emerald-100' : 'border-slate-200 bg-white text-slate-900 dark:border-slate-700 dark:bg-slate-900 dark:text-slate-100'}`}>
          <div className="flex items-start gap-2">
            <div className="min-w-0 flex-1">
              <p className="font-medium">{t.title}</p>
              {t.body && <p className="mt-0.5 break-words opacity-90">{t.body}</p>}
            </div>
            <button type="button" onClick={() => dismissToast(t.id)} aria-label="Dismiss" className="rounded p-0.5 opacity-70 hover:opacity-100"><Icon name="x" className="h-3.5 w-3.5" /></button>
          </div>
        </div>
      ))}
    </div>
  );
}
