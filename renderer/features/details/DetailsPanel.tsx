// The selected image: everything `strata info` knows, in words; its backing chain down to the
// base; the overlays that depend on it; its problems with their fixes; the allocation map; its
// internal snapshots; and its actions.
import { useCallback, useEffect, useState } from 'react';
import { Badge, Button, Icon, Spinner } from '../../components/ui';
import { client, errorText, openDialog, select, useStore, type LibraryImage } from '../../lib/store';
import { baseName, dateTime, size } from '../../lib/format';
import type { Result } from '../../../core/protocol/rpc';
import { badgesFor, holderText, problemLabel } from '../library/badges';
import { actionsFor } from '../library/ActionMenu';
import { AllocationMap } from '../map/AllocationMap';
import { SnapshotList } from '../snapshots/SnapshotList';

type Details = Result<'image.details'>;
type Tab = 'overview' | 'map' | 'snapshots';

function Row({ label, children }: { label: string; children: React.ReactNode }) {
  return (<><dt className="text-slate-500 dark:text-slate-400">{label}</dt><dd className="min-w-0 break-words">{children}</dd></>);
}

export function DetailsPanel() {
  const selected = useStore((s) => s.selected);
  const library = useStore((s) => s.library);
  const img = library?.images.find((i) => i.realPath === selected) as LibraryImage | undefined;
  const [details, setDetails] = useState<Details | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [tab, setTab] = useState<Tab>('overview');
  // The library's view of the file: when it changes (mtime, size, snapshots), details are read again.
  const version = img ? `${img.mtimeMs}:${img.actualSize}:${img.snapshots}:${img.backingName}` : '';

  const load = useCallback(async (path: string) => {
    try {
      setDetails(await client.request('image.details', { path }));
      setError(null);
    } catch (err) {
      setDetails(null);
      setError(errorText(err));
    }
  }, []);

  useEffect(() => {
    if (!img) return;
    setDetails(null);
    void load(img.path);
  }, [img?.path, version, load]);

  if (!selected) return null;
  if (!img) {
    return (
      <aside aria-label="Image details" className="w-[440px] shrink-0 border-l border-slate-200 p-5 text-sm dark:border-slate-800">
        <p>The image is no longer in the library.</p>
        <Button className="mt-3" onClick={() => select(null)}>Close</Button>
      </aside>
    );
  }
  const byReal = new Map(library!.images.map((i) => [i.realPath, i]));
  const chain: LibraryImage[] = [];
  for (let cur = img.backing ? byReal.get(img.backing) : undefined; cur && !chain.includes(cur); cur = cur.backing ? byReal.get(cur.backing) : undefined) chain.push(cur as LibraryImage);
  const dependents: LibraryImage[] = [];
  const walk = (i: LibraryImage, depth: number) => { for (const c of i.children) { const ci = byReal.get(c) as LibraryImage | undefined; if (ci && !dependents.includes(ci)) { dependents.push(ci); if (depth < 50) walk(ci, depth + 1); } } };
  walk(img, 0);
  const data = details?.info['format-specific']?.data as Record<string, unknown> | undefined;
  const tabs: { id: Tab; label: string }[] = [{ id: 'overview', label: 'Overview' }, { id: 'map', label: 'Allocation' }, { id: 'snapshots', label: `Snapshots (${img.snapshots})` }];

  return (
    <aside aria-label={`Details of ${baseName(img.path)}`} className="flex w-[440px] shrink-0 flex-col border-l border-slate-200 dark:border-slate-800" data-testid="details">
      <header className="border-b border-slate-200 px-5 pt-4 pb-3 dark:border-slate-800">
        <div className="flex items-start justify-between gap-3">
          <div className="min-w-0">
            <h2 className="truncate text-lg font-semibold" title={img.path}>{baseName(img.path)}</h2>
            <p className="truncate font-mono text-xs text-slate-500 dark:text-slate-400" title={img.path}>{img.path}</p>
          </div>
          <Button variant="ghost" small onClick={() => select(null)} aria-label="Close details"><Icon name="x" /></Button>
        </div>
        <div className="mt-2 flex flex-wrap gap-1">{badgesFor(img).map((b) => <Badge key={b.key} tone={b.tone} title={b.title}>{b.label}</Badge>)}</div>
        <div role="tablist" aria-label="Details" className="mt-3 flex gap-1">
          {tabs.map((t) => (
            <button key={t.id} type="button" role="tab" id={`tab-${t.id}`} aria-selected={tab === t.id} aria-controls={`panel-${t.id}`} tabIndex={tab === t.id ? 0 : -1}
              onClick={() => setTab(t.id)}
              onKeyDown={(e) => {
                const i = tabs.findIndex((x) => x.id === tab);
                if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
                  e.preventDefault();
                  const next = tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length]!;
                  setTab(next.id);
                  document.getElementById(`tab-${next.id}`)?.focus();
                }
              }}
              className={`rounded-md px-2.5 py-1 text-sm ${tab === t.id ? 'bg-slate-900 text-white dark:bg-slate-100 dark:text-slate-900' : 'text-slate-600 hover:bg-slate-100 dark:text-slate-300 dark:hover:bg-slate-800'}`}>
              {t.label}
            </button>
          ))}
        </div>
      </header>

      <div className="min-h-0 flex-1 overflow-y-auto px-5 py-4 text-sm" tabIndex={0} role="group" aria-label="Details">
        {tab === 'overview' && (
          <div role="tabpanel" id="panel-overview" aria-labelledby="tab-overview" className="space-y-6">
            {img.problems.filter((p) => p.code !== 'in-use').length > 0 && (
              <section aria-labelledby="problems-h">
                <h3 id="problems-h" className="mb-2 font-semibold">Problems</h3>
                <ul className="space-y-2">
                  {img.problems.filter((p) => p.code !== 'in-use').map((p) => (
                    <li key={p.code} className="rounded-md border border-amber-300 bg-amber-50 p-2.5 dark:border-amber-800 dark:bg-amber-950/50">
                      <p className="font-medium">{problemLabel(p.code)}</p>
                      <p className="text-slate-700 dark:text-slate-300">{p.message}</p>
                      {img.fixes.some((f) => f.problem === p.code) && (
                        <Button small variant="primary" className="mt-2" onClick={() => openDialog({ kind: 'fix', image: img.realPath, problem: p.code })}>Fix…</Button>
                      )}
                    </li>
                  ))}
                </ul>
              </section>
            )}
            <section aria-labelledby="about-h">
              <h3 id="about-h" className="mb-2 font-semibold">About this image</h3>
              {error && <p role="alert" className="text-red-700 dark:text-red-400">{error}</p>}
              <dl className="grid grid-cols-[9rem_1fr] gap-x-3 gap-y-1">
                <Row label="Format">{img.format ?? 'unreadable'}{img.compat ? ` (compat ${img.compat}${img.compat === '0.10' ? ', the old qcow2 version 2' : ''})` : ''}</Row>
                <Row label="Virtual size">{size(img.virtualSize)} <span className="text-slate-500 dark:text-slate-400">({img.virtualSize.toLocaleString('en')} bytes)</span></Row>
                <Row label="On disk">{size(img.actualSize)}</Row>
                {img.clusterSize && <Row label="Cluster size">{size(img.clusterSize)}{img.extendedL2 ? ', with subclusters (extended L2)' : ''}</Row>}
                {img.compressionType && <Row label="Compression">{img.compressionType} (for compressed clusters)</Row>}
                {img.refcountBits && <Row label="Refcounts">{img.refcountBits}-bit{img.lazyRefcounts ? ', lazy (repaired after a crash)' : ''}</Row>}
                <Row label="Closed cleanly">{img.dirty ? 'no: needs a check and repair before writing' : 'yes'}</Row>
                {data?.bitmaps !== undefined && <Row label="Bitmaps">{(data.bitmaps as { name: string; flags: string[] }[]).map((b) => `${b.name}${b.flags.length ? ` (${b.flags.join(', ')})` : ''}`).join(', ') || 'none'}</Row>}
                <Row label="In use">{img.inUse ? `yes, by ${holderText(img.inUse)}${img.inUse.pid ? ` (PID ${img.inUse.pid})` : ''}` : 'no'}</Row>
                <Row label="Modified">{dateTime(img.mtimeMs)}</Row>
                {img.birthtimeMs && <Row label="Created">{dateTime(img.birthtimeMs)}</Row>}
                {img.backingName && <Row label="Backing file">
                  <span className="font-mono text-xs">{img.backingName}</span>
                  <span className="block text-xs text-slate-500 dark:text-slate-400">{img.backingRelative ? `relative to this folder: ${img.backingPath}` : 'absolute path'}; format {img.backingFormat ?? 'not recorded (QEMU guesses it)'}</span>
                </Row>}
              </dl>
            </section>

            <section aria-labelledby="chain-h">
              <h3 id="chain-h" className="mb-2 font-semibold">Backing chain</h3>
              {!img.backingName ? <p className="text-slate-600 dark:text-slate-300">This image has no backing file: it holds all of its data.</p> : (
                <ol className="space-y-1" aria-label="From this image down to its base">
                  <li className="flex items-center gap-2"><Icon name="disk" className="h-4 w-4 text-teal-700" /> <span className="font-medium">{baseName(img.path)}</span> <span className="text-slate-500 dark:text-slate-400">(this image)</span></li>
                  {chain.map((c, i) => (
                    <li key={c.realPath} className="flex items-center gap-2" style={{ paddingLeft: (i + 1) * 12 }}>
                      <Icon name="chevron" className="h-3 w-3 rotate-90 text-slate-400" />
                      <button type="button" className="truncate text-teal-800 underline-offset-2 hover:underline dark:text-teal-300" onClick={() => select(c.realPath)} title={c.path}>{baseName(c.path)}</button>
                      <span className="text-xs text-slate-500 dark:text-slate-400">{i === chain.length - 1 && !c.backingName ? 'base' : ''}</span>
                    </li>
                  ))}
                  {details?.chainError && <li role="alert" className="text-red-700 dark:text-red-400">{details.chainError}</li>}
                </ol>
              )}
            </section>

            <section aria-labelledby="used-h">
              <h3 id="used-h" className="mb-2 font-semibold">Used by</h3>
              {dependents.length === 0 ? <p className="text-slate-600 dark:text-slate-300">No overlay in your folders uses this image.</p> : (
                <>
                  <p className="mb-1 text-slate-600 dark:text-slate-300">{dependents.length} image{dependents.length > 1 ? 's read' : ' reads'} through this one: changing it changes what {dependents.length > 1 ? 'they read' : 'it reads'}.</p>
                  <ul className="space-y-0.5">
                    {dependents.map((d) => (
                      <li key={d.realPath}><button type="button" className="text-teal-800 underline-offset-2 hover:underline dark:text-teal-300" onClick={() => select(d.realPath)} title={d.path}>{baseName(d.path)}</button>
                        {d.backing === img.realPath ? '' : <span className="text-xs text-slate-500 dark:text-slate-400"> (through another overlay)</span>}</li>
                    ))}
                  </ul>
                </>
              )}
            </section>
            {!details && !error && <Spinner label="Reading the image" />}
          </div>
        )}
        {tab === 'map' && (
          <div role="tabpanel" id="panel-map" aria-labelledby="tab-map">
            {img.format ? <AllocationMap path={img.path} version={version} /> : <p>The image cannot be read.</p>}
          </div>
        )}
        {tab === 'snapshots' && (
          <div role="tabpanel" id="panel-snapshots" aria-labelledby="tab-snapshots">
            <SnapshotList image={img} snapshots={details?.info.snapshots ?? []} loading={!details && !error} />
          </div>
        )}
      </div>

      <footer className="border-t border-slate-200 px-5 py-3 dark:border-slate-800">
        <h3 className="sr-only">Actions</h3>
        <div className="flex flex-wrap gap-1.5">
          {actionsFor(img).filter((a) => !a.op.startsWith('snapshot')).map((a) => (
            <Button key={a.op} small variant={a.op === 'compact' ? 'primary' : 'secondary'} disabled={!!a.disabled} title={a.disabled ?? undefined}
              onClick={() => openDialog({ kind: 'wizard', op: a.op, image: img.realPath })}>
              {a.label.replace('…', '')}
            </Button>
          ))}
        </div>
      </footer>
    </aside>
  );
}
