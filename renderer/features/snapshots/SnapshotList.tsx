// Internal snapshots of an image: ID, name, VM state size, date and guest run time, with
// create, apply and delete (each through its plan preview, which says what changes).
import { Button, Icon, Spinner } from '../../components/ui';
import { openDialog, type LibraryImage } from '../../lib/store';
import { dateTime, size } from '../../lib/format';
import type { ImageInfoMessage } from '../../../core/protocol/library';

type Snap = NonNullable<ImageInfoMessage['snapshots']>[number];

function runTime(s: Snap): string {
  const t = s['vm-clock-sec'];
  const p = (n: number) => String(n).padStart(2, '0');
  return `${p(Math.floor(t / 3600))}:${p(Math.floor(t / 60) % 60)}:${p(t % 60)}`;
}

export function SnapshotList({ image, snapshots, loading }: { image: LibraryImage; snapshots: Snap[]; loading: boolean }) {
  const writable = image.format === 'qcow2' && !image.inUse;
  return (
    <div className="space-y-3">
      <div className="flex items-center justify-between">
        <p className="text-slate-600 dark:text-slate-300">{image.format !== 'qcow2' ? 'Raw images have no internal snapshots.' : snapshots.length ? 'Saved states inside this file. Applying one brings the disk back to it; deleting frees its space.' : 'No internal snapshots yet.'}</p>
        <Button small variant="primary" disabled={!writable} title={image.inUse ? 'in use' : undefined} onClick={() => openDialog({ kind: 'wizard', op: 'snapshot-create', image: image.realPath })}>
          <Icon name="camera" /> Create
        </Button>
      </div>
      {loading && <Spinner label="Reading snapshots" />}
      {snapshots.length > 0 && (
        <table className="w-full text-left text-xs tabular-nums" data-testid="snapshot-table">
          <caption className="sr-only">Internal snapshots</caption>
          <thead className="text-slate-500 dark:text-slate-400">
            <tr><th scope="col" className="py-1 pr-2 font-medium">ID</th><th scope="col" className="pr-2 font-medium">Name</th><th scope="col" className="pr-2 font-medium">VM state</th><th scope="col" className="pr-2 font-medium">Date</th><th scope="col" className="pr-2 font-medium">Run time</th><th scope="col"><span className="sr-only">Actions</span></th></tr>
          </thead>
          <tbody className="divide-y divide-slate-100 dark:divide-slate-800">
            {snapshots.map((s) => (
              <tr key={s.id}>
                <td className="py-1.5 pr-2">{s.id}</td>
                <td className="max-w-[8rem] truncate pr-2 font-medium" title={s.name}>{s.name}</td>
                <td className="pr-2">{s['vm-state-size'] ? size(s['vm-state-size']) : 'disk only'}</td>
                <td className="pr-2 whitespace-nowrap">{dateTime(s['date-sec'] * 1000)}</td>
                <td className="pr-2">{runTime(s)}</td>
                <td className="whitespace-nowrap text-right">
                  <Button small variant="ghost" disabled={!writable} aria-label={`Apply snapshot ${s.name}`} onClick={() => openDialog({ kind: 'wizard', op: 'snapshot-apply', image: image.realPath, snapshot: s.name })}>Apply</Button>
                  <Button small variant="ghost" disabled={!writable} aria-label={`Delete snapshot ${s.name}`} onClick={() => openDialog({ kind: 'wizard', op: 'snapshot-delete', image: image.realPath, snapshot: s.name })}>Delete</Button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
