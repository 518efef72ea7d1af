// The plan of a writing job, as it is shown before anything is written: the chain afterwards,
// the bytes it copies, the space it needs against what is free, the images whose content
// changes (which need an explicit confirmation), the images in use (which block it, holder
// named), warnings, and the equivalent strata command line to copy.
import { useState } from 'react';
import { Badge, Icon } from '../../components/ui';
import { baseName, commandLine, size } from '../../lib/format';
import type { JobPlanMessage } from '../../../core/protocol/jobs';

function Figure({ label, value, hint }: { label: string; value: string; hint?: string }) {
  return (
    <div className="rounded-lg border border-slate-200 px-3 py-2 dark:border-slate-700">
      <div className="text-xs text-slate-500 dark:text-slate-400">{label}</div>
      <div className="text-base font-semibold tabular-nums">{value}</div>
      {hint && <div className="text-xs text-slate-500 dark:text-slate-400">{hint}</div>}
    </div>
  );
}

export function ChainDrawing({ chain, writes, creates }: { chain: JobPlanMessage['chainsAfter'][number]; writes: Set<string>; creates: Set<string> }) {
  return (
    <ol className="flex flex-wrap items-center gap-1.5" aria-label="Chain afterwards, from the top image to its base">
      {chain.map((l, i) => (
        <li key={l.filename + i} className="flex items-center gap-1.5">
          {i > 0 && <span aria-hidden="true" className="text-slate-400">→</span>}
          <span title={l.filename} className={`inline-flex items-center gap-1.5 rounded-md border px-2 py-1 text-xs ${creates.has(l.filename) ? 'border-emerald-400 bg-emerald-50 dark:border-emerald-700 dark:bg-emerald-950' : writes.has(l.filename) ? 'border-amber-400 bg-amber-50 dark:border-amber-700 dark:bg-amber-950' : 'border-slate-300 dark:border-slate-600'}`}>
            <Icon name="disk" className="h-3.5 w-3.5" /> {baseName(l.filename)}
            <span className="text-slate-500 dark:text-slate-400">{l.format}, {size(l.virtualSize)}</span>
            {creates.has(l.filename) ? <span className="sr-only">(new)</span> : writes.has(l.filename) ? <span className="sr-only">(changed)</span> : null}
          </span>
        </li>
      ))}
    </ol>
  );
}

export function PlanPreview({ plan, confirmed, onConfirm }: { plan: JobPlanMessage; confirmed: boolean; onConfirm: (v: boolean) => void }) {
  const [copied, setCopied] = useState(false);
  const writes = new Set(plan.writes);
  const creates = new Set(plan.creates);
  const cmd = commandLine(plan.command);
  const tight = plan.spaceAvailable !== null && plan.spaceNeeded > plan.spaceAvailable;
  const copy = async () => {
    try { await navigator.clipboard.writeText(cmd); setCopied(true); setTimeout(() => setCopied(false), 2000); } catch { setCopied(false); }
  };
  return (
    <div className="space-y-5 text-sm" data-testid="plan-preview">
      <p className="text-base font-medium">{plan.title}</p>

      {plan.problems.length > 0 && (
        <section role="alert" className="rounded-lg border border-red-300 bg-red-50 p-3 dark:border-red-800 dark:bg-red-950/60">
          <h3 className="flex items-center gap-2 font-semibold text-red-800 dark:text-red-200"><Icon name="alert" /> Cannot run</h3>
          <ul className="mt-1 space-y-1">{plan.problems.map((p) => <li key={p}>{p}</li>)}</ul>
        </section>
      )}
      {plan.blocked.length > 0 && (
        <section role="alert" className="rounded-lg border border-red-300 bg-red-50 p-3 dark:border-red-800 dark:bg-red-950/60">
          <h3 className="flex items-center gap-2 font-semibold text-red-800 dark:text-red-200"><Icon name="lock" /> Cannot run: an image is in use</h3>
          <ul className="mt-1 space-y-1">
            {plan.blocked.map((b) => (
              <li key={b.filename}><span className="font-medium">{baseName(b.filename)}</span>: {b.reason}{b.holder && !b.reason.includes(String(b.holder.pid)) ? ` (held by ${b.holder.program}, PID ${b.holder.pid}${b.holder.vm ? `, VM '${b.holder.vm}'` : ''})` : ''}</li>
            ))}
          </ul>
          <p className="mt-1 text-red-800 dark:text-red-200">Shut the virtual machine down (or stop the program) and preview again.</p>
        </section>
      )}

      <section aria-labelledby="plan-figures" className="grid grid-cols-2 gap-2 sm:grid-cols-4">
        <h3 id="plan-figures" className="sr-only">Figures</h3>
        <Figure label="Data to copy" value={size(plan.bytesToCopy)} hint={plan.bytesToRead ? `${size(plan.bytesToRead)} to read` : undefined} />
        <Figure label="Space needed" value={size(plan.spaceNeeded)} hint={plan.spaceAvailable === null ? 'free space unknown' : `${size(plan.spaceAvailable)} free`} />
        {plan.expectedSize
          ? <Figure label="Size on disk" value={`${size(plan.expectedSize.before)} → ${size(plan.expectedSize.after)}`} hint={plan.expectedSize.after < plan.expectedSize.before ? `saves ${size(plan.expectedSize.before - plan.expectedSize.after)}` : 'no saving expected'} />
          : <Figure label="Images changed" value={String(plan.writes.length + plan.creates.length + plan.removes.length + plan.renames.length)} />}
        <Figure label="Other images affected" value={String(plan.affected.length)} />
      </section>
      {plan.spaceAvailable !== null && plan.spaceNeeded > 0 && (
        <div>
          <div className="mb-1 flex justify-between text-xs text-slate-500 dark:text-slate-400"><span>Space needed against free space</span><span className="tabular-nums">{size(plan.spaceNeeded)} of {size(plan.spaceAvailable)}</span></div>
          <div className="h-2 overflow-hidden rounded-full bg-slate-200 dark:bg-slate-700" role="img" aria-label={`${size(plan.spaceNeeded)} needed of ${size(plan.spaceAvailable)} free`}>
            <div className={`h-full origin-left ${tight ? 'bg-red-600' : 'bg-teal-600'}`} style={{ transform: `scaleX(${Math.min(1, plan.spaceNeeded / Math.max(1, plan.spaceAvailable))})` }} />
          </div>
          {tight && <p className="mt-1 text-red-700 dark:text-red-400">There is not enough free space: the job would stop when the file system is full (the images stay consistent).</p>}
        </div>
      )}

      {plan.chainsAfter.length > 0 && (
        <section aria-labelledby="plan-after">
          <h3 id="plan-after" className="mb-2 font-semibold">Afterwards</h3>
          <div className="space-y-2">{plan.chainsAfter.map((c, i) => <ChainDrawing key={i} chain={c} writes={writes} creates={creates} />)}</div>
          <p className="mt-2 flex flex-wrap gap-3 text-xs text-slate-500 dark:text-slate-400">
            <span className="flex items-center gap-1"><span className="inline-block h-3 w-3 rounded-sm border border-amber-400 bg-amber-50 dark:bg-amber-950" /> changed</span>
            <span className="flex items-center gap-1"><span className="inline-block h-3 w-3 rounded-sm border border-emerald-400 bg-emerald-50 dark:bg-emerald-950" /> new</span>
          </p>
        </section>
      )}

      <section aria-labelledby="plan-files">
        <h3 id="plan-files" className="mb-1 font-semibold">Files</h3>
        <ul className="space-y-0.5">
          {plan.writes.map((w) => <li key={`w${w}`}><Badge tone="warn">changed</Badge> <span className="font-mono text-xs">{w}</span></li>)}
          {plan.creates.map((w) => <li key={`c${w}`}><Badge tone="ok">created</Badge> <span className="font-mono text-xs">{w}</span></li>)}
          {plan.renames.map((r) => <li key={`r${r.from}`}><Badge tone="info">renamed</Badge> <span className="font-mono text-xs">{r.from} → {r.to}</span></li>)}
          {plan.removes.map((w) => <li key={`d${w}`}><Badge tone="danger">deleted</Badge> <span className="font-mono text-xs">{w}</span></li>)}
          {!plan.writes.length && !plan.creates.length && !plan.renames.length && !plan.removes.length && <li className="text-slate-500 dark:text-slate-400">No file is changed.</li>}
        </ul>
      </section>

      {plan.affected.length > 0 && (
        <section aria-labelledby="plan-affected" className="rounded-lg border border-amber-300 bg-amber-50 p-3 dark:border-amber-800 dark:bg-amber-950/60">
          <h3 id="plan-affected" className="flex items-center gap-2 font-semibold"><Icon name="alert" /> Other images will read differently</h3>
          <ul className="mt-1 space-y-1">
            {plan.affected.map((a) => <li key={a.filename}><span className="font-medium">{baseName(a.filename)}</span>: {a.reason}</li>)}
          </ul>
          {plan.needsForce && (
            <label className="mt-2 flex items-start gap-2 font-medium">
              <input type="checkbox" className="mt-0.5" checked={confirmed} onChange={(e) => onConfirm(e.target.checked)} />
              <span>I understand: {plan.needsForce}. Run it anyway.</span>
            </label>
          )}
        </section>
      )}
      {plan.needsForce && plan.affected.length === 0 && (
        <label className="flex items-start gap-2 rounded-lg border border-amber-300 bg-amber-50 p-3 font-medium dark:border-amber-800 dark:bg-amber-950/60">
          <input type="checkbox" className="mt-0.5" checked={confirmed} onChange={(e) => onConfirm(e.target.checked)} />
          <span>{plan.needsForce}. Run it anyway.</span>
        </label>
      )}

      {plan.warnings.length > 0 && (
        <section aria-labelledby="plan-warn">
          <h3 id="plan-warn" className="mb-1 font-semibold">Warnings</h3>
          <ul className="list-disc space-y-0.5 pl-5">{plan.warnings.map((w) => <li key={w}>{w}</li>)}</ul>
        </section>
      )}

      <section aria-labelledby="plan-cmd">
        <h3 id="plan-cmd" className="mb-1 font-semibold">The same with the command line</h3>
        <div className="flex items-start gap-2">
          <code className="min-w-0 flex-1 rounded-md bg-slate-100 px-2 py-1.5 font-mono text-xs break-all select-all dark:bg-slate-800" data-testid="plan-command">{cmd}</code>
          <button type="button" onClick={copy} className="rounded-md border border-slate-300 px-2 py-1 text-xs hover:bg-slate-50 dark:border-slate-600 dark:hover:bg-slate-800" aria-label="Copy the command line">
            <span className="flex items-center gap-1"><Icon name={copied ? 'check' : 'copy'} className="h-3.5 w-3.5" /><span className="w-12 text-left">{copied ? 'Copied' : 'Copy'}</span></span>
          </button>
        </div>
      </section>
    </div>
  );
}
