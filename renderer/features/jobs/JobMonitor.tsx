// The job monitor: running jobs (phase, progress, bytes, a live throughput chart, ETA, cancel),
// queued ones (and what they wait for), and the history across restarts with each job's error
// in words. Every number has a fixed width, so nothing moves while progress updates.
import { useEffect, useLayoutEffect, useRef } from 'react';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { Badge, Button, Icon, ProgressBar } from '../../components/ui';
import { client, errorText, setJobs, setJobsOpen, toast, useStore, type Sample } from '../../lib/store';
import { dateTime, duration, percent, rate, size } from '../../lib/format';
import type { JobRecord } from '../../../core/protocol/jobs';

const NO_SAMPLES: Sample[] = [];

/** Bytes per second over the last few seconds of samples. */
export function currentRate(samples: Sample[]): number | null {
  if (samples.length < 2) return null;
  const last = samples[samples.length - 1]!;
  let first = samples[0]!;
  for (let i = samples.length - 2; i >= 0; i--) { first = samples[i]!; if (last.t - first.t >= 3000) break; }
  const dt = (last.t - first.t) / 1000;
  return dt > 0 ? (last.bytes - first.bytes) / dt : null;
}

/** A round top for the rate axis above max (1, 2 or 5 times a power of 1024 times a power of 10). */
export function niceTop(max: number): number {
  if (!(max > 0)) return 1;
  const unit = 1024 ** Math.min(4, Math.floor(Math.log(max) / Math.log(1024)));
  const v = (max * 1.1) / unit;
  const p = 10 ** Math.floor(Math.log10(v));
  const m = [1, 2, 5, 10].find((k) => k * p >= v)!;
  return m * p * unit;
}

function ThroughputChart({ samples }: { samples: Sample[] }) {
  const el = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  useLayoutEffect(() => {
    const dark = document.documentElement.classList.contains('dark');
    const axis = { stroke: dark ? '#94a3b8' : '#475569', grid: { stroke: dark ? '#334155' : '#e2e8f0', width: 1 }, ticks: { show: false }, font: '10px system-ui' };
    plot.current = new uPlot({
      width: 300, height: 90, legend: { show: false }, cursor: { show: false },
      scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, niceTop(max)] } },
      padding: [8, 8, 0, 0],
      axes: [{ ...axis, values: (_u, v) => v.map((s) => `${s}s`) }, { ...axis, size: 60, splits: (_u, _i, _min, max) => [0, max / 2, max], values: (_u, v) => v.map((b) => rate(b)) }],
      series: [{}, { stroke: dark ? '#2dd4bf' : '#0f766e', width: 1.5, fill: dark ? 'rgba(45,212,191,0.15)' : 'rgba(15,118,110,0.12)' }],
    }, [[], []], el.current!);
    return () => { plot.current?.destroy(); plot.current = null; };
  }, []);
  useEffect(() => {
    const xs: number[] = [];
    const ys: number[] = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1]!;
      const b = samples[i]!;
      const dt = (b.t - a.t) / 1000;
      if (dt <= 0) continue;
      xs.push(+(b.t / 1000).toFixed(2));
      ys.push((b.bytes - a.bytes) / dt);
    }
    plot.current?.setData([xs, ys]);
  }, [samples]);
  return <div ref={el} role="img" aria-label="Throughput over time" className="h-[90px] w-[300px] shrink-0" />;
}

function stateBadge(j: JobRecord) {
  switch (j.state) {
    case 'queued': return <Badge tone="neutral">queued</Badge>;
    case 'running': return <Badge tone="info">running</Badge>;
    case 'cancelling': return <Badge tone="warn">cancelling</Badge>;
    case 'succeeded': return <Badge tone="ok">done</Badge>;
    case 'failed': return <Badge tone="danger">failed</Badge>;
    case 'cancelled': return <Badge tone="neutral">cancelled</Badge>;
    default: return null;
  }
}

function RunningJob({ job }: { job: JobRecord }) {
  const samples = useStore((s) => s.samples[job.id]) ?? NO_SAMPLES;
  const p = useStore((s) => s.progress[job.id]) ?? job.progress;
  const r = currentRate(samples);
  const left = p && r && r > 0 ? ((p.bytesTotal - p.bytesDone) / r) * 1000 : null;
  const cancel = async () => {
    try { await client.request('jobs.cancel', { id: job.id }); } catch (err) { toast('error', 'Could not cancel', errorText(err)); }
  };
  return (
    <li className="flex gap-4 rounded-lg border border-slate-200 p-3 dark:border-slate-700" data-testid="running-job" data-job-id={job.id}>
      <div className="min-w-0 flex-1">
        <div className="flex items-center gap-2">
          {stateBadge(job)}
          <span className="min-w-0 flex-1 truncate font-medium" title={job.title}>{job.title}</span>
          <Button small variant="secondary" onClick={cancel} disabled={job.state !== 'running'} aria-label={`Cancel ${job.title}`}><Icon name="stop" className="h-3.5 w-3.5" /> Cancel</Button>
        </div>
        <div className="mt-2"><ProgressBar value={p && p.bytesTotal ? p.bytesDone / p.bytesTotal : 0} label={`Progress of ${job.title}`} /></div>
        <dl className="mt-2 grid grid-cols-5 gap-2 text-xs tabular-nums text-slate-600 dark:text-slate-300">
          <div><dt className="text-slate-500 dark:text-slate-400">Phase</dt><dd className="truncate" data-testid="job-phase">{p?.phase || 'starting'}</dd></div>
          <div><dt className="text-slate-500 dark:text-slate-400">Done</dt><dd data-testid="job-percent">{p ? percent(p.bytesDone, p.bytesTotal) : '0%'}</dd></div>
          <div><dt className="text-slate-500 dark:text-slate-400">Bytes</dt><dd>{p ? `${size(p.bytesDone)} / ${size(p.bytesTotal)}` : '–'}</dd></div>
          <div><dt className="text-slate-500 dark:text-slate-400">Speed</dt><dd>{r !== null ? rate(r) : '–'}</dd></div>
          <div><dt className="text-slate-500 dark:text-slate-400">Time left</dt><dd>{left !== null ? duration(left) : '–'}</dd></div>
        </dl>
      </div>
      <ThroughputChart samples={samples} />
    </li>
  );
}

function QueuedJob({ job }: { job: JobRecord }) {
  const cancel = async () => {
    try { await client.request('jobs.cancel', { id: job.id }); } catch (err) { toast('error', 'Could not cancel', errorText(err)); }
  };
  return (
    <li className="flex items-center gap-2 rounded-lg border border-dashed border-slate-300 p-3 text-sm dark:border-slate-600">
      {stateBadge(job)}
      <span className="min-w-0 flex-1 truncate font-medium">{job.title}</span>
      <span className="text-xs text-slate-500 dark:text-slate-400">{job.waitingFor}</span>
      <Button small onClick={cancel}>Cancel</Button>
    </li>
  );
}

function FinishedJob({ job }: { job: JobRecord }) {
  return (
    <li className="grid grid-cols-[auto_1fr_auto] items-start gap-x-3 py-2 text-sm">
      <span className="pt-0.5">{stateBadge(job)}</span>
      <div className="min-w-0">
        <p className="truncate font-medium" title={job.title}>{job.title}</p>
        {job.summary && <p className="text-xs text-slate-600 dark:text-slate-300">{job.summary}</p>}
        {job.error && <p className="text-xs text-red-700 dark:text-red-400" data-testid="job-error">{job.error.message}</p>}
      </div>
      <div className="text-right text-xs tabular-nums text-slate-500 dark:text-slate-400">
        {job.endedAt && <div>{dateTime(job.endedAt)}</div>}
        {job.startedAt && job.endedAt && <div>{duration(job.endedAt - job.startedAt)}{job.bytesWritten ? `, ${size(job.bytesWritten)} written` : ''}</div>}
      </div>
    </li>
  );
}

export function JobMonitor() {
  const jobs = useStore((s) => s.jobs);
  const running = jobs.filter((j) => j.state === 'running' || j.state === 'cancelling');
  const queued = jobs.filter((j) => j.state === 'queued');
  const done = jobs.filter((j) => j.state !== 'running' && j.state !== 'cancelling' && j.state !== 'queued');
  const clear = async () => {
    try { setJobs(await client.request('jobs.clearHistory', {})); } catch (err) { toast('error', 'Could not clear the history', errorText(err)); }
  };
  return (
    <section id="job-monitor" aria-labelledby="jobs-h" className="flex h-80 shrink-0 flex-col border-t border-slate-200 bg-slate-50/60 dark:border-slate-800 dark:bg-slate-900/40" data-testid="job-monitor">
      <header className="flex items-center justify-between px-5 py-2">
        <h2 id="jobs-h" className="font-semibold">Jobs</h2>
        <div className="flex gap-1">
          <Button small variant="ghost" onClick={clear} disabled={!done.length}>Clear history</Button>
          <Button small variant="ghost" onClick={() => setJobsOpen(false)} aria-label="Close the job monitor"><Icon name="x" /></Button>
        </div>
      </header>
      {/* Focusable, so that a keyboard can scroll the history too. */}
      <div className="min-h-0 flex-1 overflow-y-auto px-5 pb-4" tabIndex={0} role="group" aria-label="Job list">
        {jobs.length === 0 && <p className="text-sm text-slate-500 dark:text-slate-400">No jobs yet. Every writing action runs here, in its own process, with its progress.</p>}
        {running.length > 0 && <ul aria-label="Running" className="space-y-2">{running.map((j) => <RunningJob key={j.id} job={j} />)}</ul>}
        {queued.length > 0 && <ul aria-label="Queued" className="mt-2 space-y-2">{queued.map((j) => <QueuedJob key={j.id} job={j} />)}</ul>}
        {done.length > 0 && (
          <>
            <h3 className="mt-4 text-xs font-semibold uppercase tracking-wide text-slate-500 dark:text-slate-400">History</h3>
            <ul aria-label="Finished jobs" className="divide-y divide-slate-200 dark:divide-slate-800">{done.map((j) => <FinishedJob key={j.id} job={j} />)}</ul>
          </>
        )}
      </div>
    </section>
  );
}
