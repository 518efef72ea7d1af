// Adding folders: the dialog with the folder browser, and the empty state a newcomer sees
// (the usual libvirt and GNOME Boxes folders that exist here, and a sample library).
import { useCallback, useState } from 'react';
import { Dialog } from '../../components/dialog';
import { Button, Icon } from '../../components/ui';
import { client, errorText, openDialog, setSettings, toast, useStore } from '../../lib/store';
import { FolderPicker } from './FolderPicker';

export function AddFolderDialog() {
  const app = useStore((s) => s.app);
  const [path, setPath] = useState(app?.suggestedFolders[0] ?? app?.home ?? '/');
  const [busy, setBusy] = useState(false);
  const close = useCallback(() => openDialog(null), []);
  const add = async () => {
    setBusy(true);
    try {
      setSettings(await client.request('library.addFolder', { path }));
      close();
    } catch (err) {
      toast('error', 'Could not add the folder', errorText(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Dialog title="Add a folder to the library" onClose={close} footer={<>
      <Button onClick={close}>Cancel</Button>
      <Button variant="primary" onClick={add} disabled={busy || !path}>Add this folder</Button>
    </>}>
      <p className="mb-3 text-sm text-slate-600 dark:text-slate-300">Strata shows every qcow2 and raw image in the folder and below it, and watches it for changes. It changes nothing until you run a job.</p>
      <FolderPicker start={path} mode="folder" value={path} onValue={setPath} />
    </Dialog>
  );
}

export function EmptyLibrary() {
  const app = useStore((s) => s.app);
  const [busy, setBusy] = useState<string | null>(null);
  const add = async (path: string) => {
    setBusy(path);
    try { setSettings(await client.request('library.addFolder', { path })); } catch (err) { toast('error', 'Could not add the folder', errorText(err)); } finally { setBusy(null); }
  };
  const demo = async () => {
    setBusy('demo');
    try { setSettings(await client.request('library.createDemo', {})); } catch (err) { toast('error', 'Could not create the sample library', errorText(err)); } finally { setBusy(null); }
  };
  return (
    <div className="mx-auto max-w-xl px-6 py-16">
      <h1 className="text-2xl font-semibold tracking-tight">Your disk images, as chains</h1>
      <p className="mt-2 text-slate-600 dark:text-slate-300">Add the folders where your virtual machines keep their qcow2 and raw images. Strata draws which image is based on which, shows what each one holds, and runs compaction, commit, rebase and the rest with a preview before anything is written.</p>
      {app && app.suggestedFolders.length > 0 && (
        <section className="mt-8" aria-labelledby="found-h">
          <h2 id="found-h" className="text-sm font-semibold">Image folders found on this machine</h2>
          <ul className="mt-2 space-y-2">
            {app.suggestedFolders.map((f) => (
              <li key={f} className="flex items-center justify-between gap-3 rounded-lg border border-slate-200 px-3 py-2 dark:border-slate-700">
                <span className="flex min-w-0 items-center gap-2 font-mono text-sm"><Icon name="folder" /> <span className="truncate">{f}</span></span>
                <Button small variant="primary" disabled={!!busy} onClick={() => add(f)}>Add</Button>
              </li>
            ))}
          </ul>
        </section>
      )}
      <div className="mt-8 flex flex-wrap gap-3">
        <Button variant="primary" onClick={() => openDialog({ kind: 'add-folder' })} disabled={!!busy}><Icon name="plus" /> Add a folder…</Button>
        <Button onClick={demo} disabled={!!busy}><Icon name="sparkle" /> {busy === 'demo' ? 'Creating…' : 'Try a sample library'}</Button>
      </div>
      <p className="mt-3 text-xs text-slate-500 dark:text-slate-400">The sample library is a few small images in a temporary folder: a shared base, a three-deep chain, internal snapshots and an overlay whose backing file is missing.</p>
    </div>
  );
}
