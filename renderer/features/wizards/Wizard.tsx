// Every writing action is a wizard that ends in the plan's preview: a few choices (none for
// the one-click ones), then the plan exactly as the job will follow it, then Run. Nothing is
// written before Run; a plan that is blocked cannot be run, and one that changes other images
// needs an explicit confirmation.
import { useCallback, useEffect, useMemo, useState, type ReactNode } from 'react';
import { Dialog } from '../../components/dialog';
import { Button, Spinner } from '../../components/ui';
import { client, errorText, openDialog, setJobsOpen, toast, useStore, type LibraryImage, type WizardOp } from '../../lib/store';
import { baseName, dirName, size } from '../../lib/format';
import type { JobPlanMessage, JobSpecMessage } from '../../../core/protocol/jobs';
import { PlanPreview } from './PlanPreview';
import { FolderPicker } from '../library/FolderPicker';
import { holderText } from '../library/badges';

const TITLES: Record<WizardOp, string> = {
  compact: 'Compact', commit: 'Commit into the backing file', empty: 'Empty after commit', merge: 'Merge this layer away',
  rebase: 'Rebase', check: 'Check and repair', convert: 'Convert', resize: 'Resize', mirror: 'Mirror',
  'snapshot-create': 'Create a snapshot', 'snapshot-apply': 'Apply a snapshot', 'snapshot-delete': 'Delete a snapshot',
};

/** What each operation does, in one or two sentences, above its choices. */
const ABOUT: Record<WizardOp, string> = {
  compact: 'Rewrites the image with only its live data, keeping its format options, backing file and bitmaps. It is written beside the original, compared with it, and only then put in its place: any failure leaves the original as it was.',
  commit: 'Copies what this overlay holds into its backing file, so the backing file then reads as this overlay does. Other overlays of the same backing file would read differently.',
  empty: 'Drops the data of this overlay that its backing file already holds (after a commit that kept it). Every range is compared first; nothing is dropped if any differs.',
  merge: 'Removes this layer from its chain (what people mean by deleting an external snapshot): its data goes into its backing file, its overlays are pointed at that file, and it is deleted. Every image reads the same throughout.',
  rebase: 'Points this image at another backing file. A safe rebase copies into the image whatever differs between the old and the new backing file, so it reads the same afterwards; an unsafe rebase only changes the name (for a backing file that was moved or renamed).',
  check: 'Checks the image\'s metadata and repairs what it finds: leaked clusters only, or also refcount errors.',
  convert: 'Writes a copy of the image (through its backing chain) as a new file, sparse: zeros are never written.',
  resize: 'Changes the size of the virtual disk. Growing adds zeros at the end; shrinking drops everything past the new end (the guest\'s partitions must be shrunk first).',
  mirror: 'Copies the image to another file, keeping the target sparse.',
  'snapshot-create': 'Saves the current disk state inside the image under a name. It costs no copy now; later writes keep both versions.',
  'snapshot-apply': 'Brings the disk back to the snapshot: everything written since it was taken is lost (other snapshots stay).',
  'snapshot-delete': 'Deletes the snapshot and frees the space only it used. The current disk state does not change.',
};

const inputClass = 'w-full rounded-md border border-slate-300 bg-white px-2 py-1.5 text-sm dark:border-slate-600 dark:bg-slate-800';

function Field({ label, children, hint }: { label: string; children: ReactNode; hint?: string }) {
  return (
    <label className="block text-sm">
      <span className="font-medium">{label}</span>
      <div className="mt-1">{children}</div>
      {hint && <span className="mt-1 block text-xs text-slate-500 dark:text-slate-400">{hint}</span>}
    </label>
  );
}

function Choice({ name, value, current, onChange, title, children }: { name: string; value: string; current: string; onChange: (v: string) => void; title: string; children?: ReactNode }) {
  return (
    <label className={`flex cursor-pointer gap-2 rounded-lg border p-2.5 text-sm ${current === value ? 'border-teal-600 bg-teal-50 dark:border-teal-500 dark:bg-teal-950/50' : 'border-slate-200 dark:border-slate-700'}`}>
      <input type="radio" name={name} value={value} checked={current === value} onChange={() => onChange(value)} className="mt-0.5" />
      <span><span className="font-medium">{title}</span>{children && <span className="block text-slate-600 dark:text-slate-300">{children}</span>}</span>
    </label>
  );
}

const SIZE_UNITS: Record<string, number> = { MiB: 2 ** 20, GiB: 2 ** 30, TiB: 2 ** 40 };

/** Builds the job description from the choices; null while a choice is missing. */
type Builder = () => JobSpecMessage | null;

export function Wizard({ op, imagePath, snapshot }: { op: WizardOp; imagePath: string; snapshot?: string }) {
  const library = useStore((s) => s.library);
  const img = library?.images.find((i) => i.realPath === imagePath) as LibraryImage | undefined;
  const close = useCallback(() => openDialog(null), []);
  const [step, setStep] = useState<'choose' | 'preview'>(() => (['compact', 'empty', 'merge', 'snapshot-apply', 'snapshot-delete'].includes(op) ? 'preview' : 'choose'));
  const [spec, setSpec] = useState<JobSpecMessage | null>(null);
  const [plan, setPlan] = useState<JobPlanMessage | null>(null);
  const [planError, setPlanError] = useState<string | null>(null);
  const [confirmed, setConfirmed] = useState(false);
  const [running, setRunning] = useState(false);
  const [build, setBuild] = useState<{ fn: Builder }>({ fn: () => null });
  // Stable, so the choices' effect runs when a choice changes, not at every render.
  const onBuild = useCallback((fn: Builder) => setBuild({ fn }), []);

  // The one-click operations have their description at once.
  const direct = useMemo<JobSpecMessage | null>(() => {
    if (!img) return null;
    switch (op) {
      case 'compact': return { op: 'compact', image: img.path };
      case 'empty': return { op: 'empty', image: img.path };
      case 'merge': return { op: 'merge', image: img.path };
      case 'snapshot-apply': return { op: 'snapshot', image: img.path, action: 'apply', name: snapshot! };
      case 'snapshot-delete': return { op: 'snapshot', image: img.path, action: 'delete', name: snapshot! };
      default: return null;
    }
  }, [img?.path, op, snapshot]);

  const preview = useCallback(async (s: JobSpecMessage) => {
    setSpec(s);
    setStep('preview');
    setPlan(null);
    setPlanError(null);
    setConfirmed(false);
    try { setPlan(await client.request('jobs.plan', { spec: s })); } catch (err) { setPlanError(errorText(err)); }
  }, []);

  useEffect(() => { if (direct && step === 'preview' && !spec) void preview(direct); }, [direct, step, spec, preview]);

  if (!img) {
    return <Dialog title={TITLES[op]} onClose={close}><p>The image is no longer in the library.</p></Dialog>;
  }

  const run = async () => {
    if (!spec || !plan) return;
    setRunning(true);
    try {
      await client.request('jobs.start', { spec, force: confirmed });
      toast('info', `${plan.title}: started`, 'Follow it in the job monitor.');
      setJobsOpen(true);
      close();
    } catch (err) {
      toast('error', `${plan.title}: not started`, errorText(err));
      setRunning(false);
    }
  };

  const canRun = !!plan && plan.blocked.length === 0 && plan.problems.length === 0 && (!plan.needsForce || confirmed) && !running;
  const choosing = step === 'choose';
  const footer = choosing
    ? <>
        <Button onClick={close}>Cancel</Button>
        <Button variant="primary" onClick={() => { const s = build.fn(); if (s) void preview(s); }} disabled={!build.fn()}>Preview the plan</Button>
      </>
    : <>
        {!direct && <Button onClick={() => { setStep('choose'); setPlan(null); }}>Back</Button>}
        <Button onClick={close}>Cancel</Button>
        <Button variant={op === 'snapshot-apply' || op === 'merge' ? 'danger' : 'primary'} onClick={run} disabled={!canRun} data-testid="run-job">
          {running ? 'Starting…' : plan?.blocked.length || plan?.problems.length ? 'Cannot run' : 'Run'}
        </Button>
      </>;

  return (
    <Dialog title={`${TITLES[op]}: ${baseName(img.path)}`} onClose={close} footer={footer} wide>
      <p className="mb-4 text-sm text-slate-600 dark:text-slate-300">{ABOUT[op]}</p>
      {choosing && <Choices op={op} img={img} onBuild={onBuild} />}
      {!choosing && (
        <>
          {op === 'compact' && spec?.op === 'compact' && (
            <label className="mb-4 flex items-center gap-2 text-sm">
              <input type="checkbox" checked={!!spec.compress} onChange={(e) => void preview({ op: 'compact', image: img.path, compress: e.target.checked })} />
              Compress the data too (smaller, slower to read)
            </label>
          )}
          {!plan && !planError && <div className="flex items-center gap-2 text-sm"><Spinner label="Planning" /> Working out what the job will do…</div>}
          {planError && <p role="alert" className="rounded-lg border border-red-300 bg-red-50 p-3 text-sm text-red-800 dark:border-red-800 dark:bg-red-950/60 dark:text-red-200">{planError}</p>}
          {plan && <PlanPreview plan={plan} confirmed={confirmed} onConfirm={setConfirmed} />}
        </>
      )}
    </Dialog>
  );
}

function Choices({ op, img, onBuild }: { op: WizardOp; img: LibraryImage; onBuild: (fn: Builder) => void }) {
  const library = useStore((s) => s.library)!;
  const app = useStore((s) => s.app);
  const byReal = useMemo(() => new Map(library.images.map((i) => [i.realPath, i as LibraryImage])), [library]);
  const chainBelow = useMemo(() => {
    const out: LibraryImage[] = [];
    for (let c = img.backing ? byReal.get(img.backing) : undefined; c && !out.includes(c); c = c.backing ? byReal.get(c.backing) : undefined) out.push(c);
    return out;
  }, [img, byReal]);
  const below = useMemo(() => {
    const out = new Set<string>([img.realPath]);
    const stack = [...img.children];
    while (stack.length) { const c = stack.pop()!; if (!out.has(c)) { out.add(c); stack.push(...(byReal.get(c)?.children ?? [])); } }
    return out;
  }, [img, byReal]);

  // commit
  const [base, setBase] = useState(chainBelow[0]?.path ?? '');
  const [emptyAfter, setEmptyAfter] = useState(true);
  // rebase
  const [rebaseTo, setRebaseTo] = useState<string>(img.candidates[0]?.path ?? chainBelow[0]?.path ?? '');
  const [rebaseMode, setRebaseMode] = useState<'safe' | 'unsafe'>(img.problems.some((p) => p.code === 'backing-missing') ? 'unsafe' : 'safe');
  const [rebaseSource, setRebaseSource] = useState<'library' | 'file' | 'none'>('library');
  const [rebaseFile, setRebaseFile] = useState(dirName(img.path));
  // check
  const [repair, setRepair] = useState<'leaks' | 'all'>('all');
  // convert / mirror
  const stem = baseName(img.path).replace(/\.(qcow2|img|raw)$/i, '');
  const [target, setTarget] = useState(`${dirName(img.path)}/${stem}-copy.qcow2`);
  const [targetFormat, setTargetFormat] = useState<'qcow2' | 'raw'>('qcow2');
  const [compress, setCompress] = useState(false);
  const [sync, setSync] = useState<'full' | 'top'>('full');
  // resize
  const [sizeValue, setSizeValue] = useState(() => String(+(img.virtualSize / 2 ** 30).toFixed(2)));
  const [unit, setUnit] = useState('GiB');
  // snapshot
  const [snapName, setSnapName] = useState(() => `snapshot-${new Date().toISOString().slice(0, 16).replace(/[:T]/g, '-')}`);

  const newSize = Math.round(Number(sizeValue) * SIZE_UNITS[unit]! / 512) * 512;
  useEffect(() => {
    const fns: Partial<Record<WizardOp, Builder>> = {
      commit: () => (base ? { op: 'commit', image: img.path, ...(base !== chainBelow[0]?.path ? { base } : {}), ...(emptyAfter && base === chainBelow[0]?.path ? {} : { keep: true }) } : null),
      rebase: () => {
        if (rebaseSource === 'none') return { op: 'rebase', image: img.path, backing: '' };
        const to = rebaseSource === 'file' ? rebaseFile : rebaseTo;
        const fmt = library.images.find((i) => i.path === to)?.format ?? undefined;
        if (!to) return null;
        return { op: 'rebase', image: img.path, backing: to, ...(fmt ? { backingFormat: fmt } : {}), ...(rebaseMode === 'unsafe' ? { unsafe: true } : {}) };
      },
      check: () => ({ op: 'check', image: img.path, repair }),
      convert: () => (target ? { op: 'convert', source: img.path, target, targetFormat, ...(compress && targetFormat === 'qcow2' ? { compress: true } : {}) } : null),
      mirror: () => (target ? { op: 'mirror', source: img.path, target, targetFormat, sync } : null),
      resize: () => (Number.isFinite(newSize) && newSize > 0 && newSize !== img.virtualSize ? { op: 'resize', image: img.path, size: newSize, ...(newSize < img.virtualSize ? { shrink: true } : {}) } : null),
      'snapshot-create': () => (snapName.trim() ? { op: 'snapshot', image: img.path, action: 'create', name: snapName.trim() } : null),
    };
    onBuild(fns[op] ?? (() => null));
  }, [op, img.path, base, emptyAfter, rebaseTo, rebaseMode, rebaseSource, rebaseFile, repair, target, targetFormat, compress, sync, newSize, snapName, chainBelow, library, onBuild]);

  switch (op) {
    case 'commit':
      return (
        <div className="space-y-4">
          <Field label="Commit into" hint="The data goes into this image; the layers between are left as they are.">
            <select value={base} onChange={(e) => setBase(e.target.value)} className={inputClass}>
              {chainBelow.map((c, i) => <option key={c.realPath} value={c.path}>{baseName(c.path)}{i === 0 ? ' (its backing file)' : ` (${i + 1} levels down)`}{c.children.length > 1 ? `: shared by ${c.children.length} overlays` : ''}</option>)}
            </select>
          </Field>
          <label className={`flex items-start gap-2 text-sm ${base !== chainBelow[0]?.path ? 'opacity-50' : ''}`}>
            <input type="checkbox" checked={emptyAfter && base === chainBelow[0]?.path} disabled={base !== chainBelow[0]?.path} onChange={(e) => setEmptyAfter(e.target.checked)} className="mt-0.5" />
            <span><span className="font-medium">Empty this overlay afterwards</span><span className="block text-slate-600 dark:text-slate-300">Its data is then only in the backing file, and the overlay takes almost no space. Keep it to commit again later (qemu-img commit -d).</span></span>
          </label>
        </div>
      );
    case 'rebase':
      return (
        <div className="space-y-4">
          <fieldset className="space-y-2">
            <legend className="mb-1 text-sm font-medium">New backing file</legend>
            <Choice name="src" value="library" current={rebaseSource} onChange={(v) => setRebaseSource(v as 'library')} title="An image in the library">
              <select aria-label="Image in the library" value={rebaseTo} onChange={(e) => setRebaseTo(e.target.value)} className={`${inputClass} mt-1`} disabled={rebaseSource !== 'library'}>
                {img.candidates.map((c) => <option key={`c${c.path}`} value={c.path}>{baseName(c.path)}: candidate ({c.reason})</option>)}
                {library.images.filter((i) => !below.has(i.realPath) && i.format && !img.candidates.some((c) => c.path === i.path)).map((i) => <option key={i.realPath} value={i.path}>{i.path}</option>)}
              </select>
            </Choice>
            <Choice name="src" value="file" current={rebaseSource} onChange={(v) => setRebaseSource(v as 'file')} title="A file" />
            {rebaseSource === 'file' && <FolderPicker start={dirName(img.path)} mode="file" value={rebaseFile} onValue={setRebaseFile} />}
            <Choice name="src" value="none" current={rebaseSource} onChange={(v) => setRebaseSource(v as 'none')} title="None: make it standalone">
              Copies everything it reads from its backing chain into it (it grows by that much).
            </Choice>
          </fieldset>
          {rebaseSource !== 'none' && (
            <fieldset className="space-y-2">
              <legend className="mb-1 text-sm font-medium">How</legend>
              <Choice name="mode" value="safe" current={rebaseMode} onChange={(v) => setRebaseMode(v as 'safe')} title="Safe (recommended)">
                Copies what differs between the old and the new backing file into this image, so it reads exactly as before. Needs the old backing file.
              </Choice>
              <Choice name="mode" value="unsafe" current={rebaseMode} onChange={(v) => setRebaseMode(v as 'unsafe')} title="Unsafe: only change the recorded name">
                For a backing file that was moved or renamed, with the same content. If the new file differs, this image reads differently afterwards.
              </Choice>
            </fieldset>
          )}
        </div>
      );
    case 'check':
      return (
        <fieldset className="space-y-2">
          <legend className="mb-1 text-sm font-medium">Repair</legend>
          <Choice name="repair" value="all" current={repair} onChange={(v) => setRepair(v as 'all')} title="Everything it can (-r all)">Leaked clusters and refcount errors. Needed after a crash with lazy refcounts.</Choice>
          <Choice name="repair" value="leaks" current={repair} onChange={(v) => setRepair(v as 'leaks')} title="Leaked clusters only (-r leaks)">Frees space nothing uses; changes nothing else.</Choice>
        </fieldset>
      );
    case 'convert':
    case 'mirror':
      return (
        <div className="space-y-4">
          <Field label="Target file" hint={op === 'convert' ? 'A new file; it must not exist yet.' : 'A new file, or an existing one of the same size to bring up to date.'}>
            <input value={target} onChange={(e) => setTarget(e.target.value)} spellCheck={false} className={`${inputClass} font-mono`} />
          </Field>
          <Field label="Format">
            <select value={targetFormat} onChange={(e) => { const f = e.target.value as 'qcow2' | 'raw'; setTargetFormat(f); setTarget((t) => t.replace(/\.(qcow2|raw|img)$/i, f === 'raw' ? '.raw' : '.qcow2')); }} className={inputClass}>
              <option value="qcow2">qcow2</option>
              <option value="raw">raw</option>
            </select>
          </Field>
          {op === 'convert' && targetFormat === 'qcow2' && (
            <label className="flex items-center gap-2 text-sm"><input type="checkbox" checked={compress} onChange={(e) => setCompress(e.target.checked)} /> Compress (smaller, slower to read)</label>
          )}
          {op === 'mirror' && (
            <fieldset className="space-y-2">
              <legend className="mb-1 text-sm font-medium">What to copy</legend>
              <Choice name="sync" value="full" current={sync} onChange={(v) => setSync(v as 'full')} title="Everything the image reads (standalone copy)" />
              <Choice name="sync" value="top" current={sync} onChange={(v) => setSync(v as 'top')} title="Only this layer (the copy uses the same backing file)" />
            </fieldset>
          )}
        </div>
      );
    case 'resize':
      return (
        <div className="space-y-3">
          <p className="text-sm">Now: <span className="font-medium tabular-nums">{size(img.virtualSize)}</span></p>
          <div className="flex gap-2">
            <Field label="New size"><input type="number" min="0" step="any" value={sizeValue} onChange={(e) => setSizeValue(e.target.value)} className={`${inputClass} w-40 tabular-nums`} /></Field>
            <Field label="Unit"><select value={unit} onChange={(e) => setUnit(e.target.value)} className={inputClass}>{Object.keys(SIZE_UNITS).map((u) => <option key={u}>{u}</option>)}</select></Field>
          </div>
          {newSize < img.virtualSize && <p role="alert" className="rounded-md border border-red-300 bg-red-50 p-2 text-sm text-red-800 dark:border-red-800 dark:bg-red-950/60 dark:text-red-200">Shrinking deletes everything past {size(newSize)}. Shrink the guest's file systems and partitions first.</p>}
          {img.inUse && <p className="text-sm">In use by {holderText(img.inUse)}.</p>}
        </div>
      );
    case 'snapshot-create':
      return (
        <Field label="Snapshot name"><input value={snapName} onChange={(e) => setSnapName(e.target.value)} maxLength={200} className={inputClass} /></Field>
      );
    default:
      return null;
  }
}
