// A problem's fixes (the library's exact commands: a rebase -u to a moved backing file's new
// place, recording a backing format, a repair), through the same plan preview as every wizard.
import { useCallback, useEffect, useState } from 'react';
import { Dialog } from '../../components/dialog';
import { Button, Spinner } from '../../components/ui';
import { client, errorText, openDialog, setJobsOpen, toast, useStore, type LibraryImage } from '../../lib/store';
import { baseName, commandLine } from '../../lib/format';
import type { JobPlanMessage } from '../../../core/protocol/jobs';
import { PlanPreview } from './PlanPreview';
import { problemLabel } from '../library/badges';

export function FixDialog({ imagePath, problem }: { imagePath: string; problem: string }) {
  const img = useStore((s) => s.library?.images.find((i) => i.realPath === imagePath)) as LibraryImage | undefined;
  const close = useCallback(() => openDialog(null), []);
  const fixes = img?.fixes.filter((f) => f.problem === problem) ?? [];
  const [chosen, setChosen] = useState(0);
  const [plan, setPlan] = useState<JobPlanMessage | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [confirmed, setConfirmed] = useState(false);
  const [running, setRunning] = useState(false);
  const fix = fixes[chosen];

  useEffect(() => {
    if (!fix) return;
    let live = true;
    setPlan(null);
    setError(null);
    setConfirmed(false);
    client.request('jobs.plan', { spec: fix.job }).then((p) => { if (live) setPlan(p); }, (err) => { if (live) setError(errorText(err)); });
    return () => { live = false; };
  }, [fix?.command.join('\0')]);

  if (!img) return <Dialog title="Fix" onClose={close}><p>The image is no longer in the library.</p></Dialog>;
  const message = img.problems.find((p) => p.code === problem)?.message;

  const run = async () => {
    if (!fix || !plan) return;
    setRunning(true);
    try {
      await client.request('jobs.start', { spec: fix.job, force: confirmed });
      toast('info', `${plan.title}: started`);
      setJobsOpen(true);
      close();
    } catch (err) {
      toast('error', 'The fix did not start', errorText(err));
      setRunning(false);
    }
  };

  return (
    <Dialog wide title={`Fix ${baseName(img.path)}: ${problemLabel(problem)}`} onClose={close} footer={<>
      <Button onClick={close}>Cancel</Button>
      <Button variant="primary" onClick={run} disabled={!plan || running || plan.blocked.length > 0 || plan.problems.length > 0 || (!!plan.needsForce && !confirmed)} data-testid="run-fix">Apply this fix</Button>
    </>}>
      {message && <p className="mb-4 text-sm">{message}</p>}
      {fixes.length === 0 && <p className="text-sm">There is no automatic fix for this problem.</p>}
      {fixes.length > 1 && (
        <fieldset className="mb-4 space-y-2">
          <legend className="mb-1 text-sm font-medium">Choose a fix</legend>
          {fixes.map((f, i) => (
            <label key={i} className={`flex cursor-pointer gap-2 rounded-lg border p-2.5 text-sm ${chosen === i ? 'border-teal-600 bg-teal-50 dark:border-teal-500 dark:bg-teal-950/50' : 'border-slate-200 dark:border-slate-700'}`}>
              <input type="radio" name="fix" checked={chosen === i} onChange={() => setChosen(i)} className="mt-0.5" />
              <span><span className="font-medium">{f.description}</span><code className="mt-0.5 block text-xs break-all text-slate-500 dark:text-slate-400">{commandLine(f.command)}</code></span>
            </label>
          ))}
        </fieldset>
      )}
      {fix && fixes.length === 1 && <p className="mb-4 text-sm font-medium">{fix.description}</p>}
      {fix && !plan && !error && <div className="flex items-center gap-2 text-sm"><Spinner label="Planning" /> Working out what the fix will do…</div>}
      {error && <p role="alert" className="rounded-lg border border-red-300 bg-red-50 p-3 text-sm text-red-800 dark:border-red-800 dark:bg-red-950/60 dark:text-red-200">{error}</p>}
      {plan && <PlanPreview plan={plan} confirmed={confirmed} onConfirm={setConfirmed} />}
    </Dialog>
  );
}
