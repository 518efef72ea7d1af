// Choosing a folder (or a file) on the machine Strata runs on: a small browser over fs.list,
// which works the same in the desktop window and in browser mode on a headless host.
import { useCallback, useEffect, useState } from 'react';
import { Button, Icon, Spinner } from '../../components/ui';
import { client, errorText } from '../../lib/store';
import { nativeChooser } from '../../lib/client';
import { size } from '../../lib/format';
import type { Result } from '../../../core/protocol/rpc';

type Listing = Result<'fs.list'>;

export function FolderPicker({ start, mode, onPick, value, onValue }: {
  start: string;
  /** 'folder': folders are picked; 'file': image files are picked, folders opened. */
  mode: 'folder' | 'file';
  onPick?: (path: string) => void;
  value: string;
  onValue: (path: string) => void;
}) {
  const [listing, setListing] = useState<Listing | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [loading, setLoading] = useState(false);
  const chooser = nativeChooser();

  const open = useCallback(async (path: string) => {
    setLoading(true);
    try {
      const l = await client.request('fs.list', { path });
      setListing(l);
      setError(null);
      if (mode === 'folder') onValue(l.path);
    } catch (err) {
      setError(errorText(err));
    } finally {
      setLoading(false);
    }
  }, [mode, onValue]);

  useEffect(() => { void open(start); }, [start, open]);

  return (
    <div className="space-y-2">
      <label className="block text-sm font-medium">
        {mode === 'folder' ? 'Folder' : 'File'}
        <div className="mt-1 flex gap-2">
          <input value={value} onChange={(e) => onValue(e.target.value)} spellCheck={false}
            onKeyDown={(e) => { if (e.key === 'Enter' && mode === 'folder') { e.preventDefault(); void open(value); } }}
            className="min-w-0 flex-1 rounded-md border border-slate-300 bg-white px-2 py-1.5 font-mono text-sm dark:border-slate-600 dark:bg-slate-800" />
          {mode === 'folder' && <Button small onClick={() => void open(value)}>Go</Button>}
          {chooser && (
            <Button small onClick={async () => {
              const picked = await chooser(mode);
              if (!picked) return;
              onValue(picked);
              if (mode === 'folder') void open(picked);
            }}>Choose…</Button>
          )}
        </div>
      </label>
      {error && <p role="alert" className="text-sm text-red-700 dark:text-red-400">{error}</p>}
      <div className="h-64 overflow-y-auto rounded-md border border-slate-200 dark:border-slate-700" aria-busy={loading}>
        {!listing && loading && <div className="p-3"><Spinner /></div>}
        {listing && (
          <ul aria-label={`Contents of ${listing.path}`} className="divide-y divide-slate-100 text-sm dark:divide-slate-800">
            {listing.parent && (
              <li><button type="button" onClick={() => void open(listing.parent!)} className="flex w-full items-center gap-2 px-3 py-1.5 text-left hover:bg-slate-50 dark:hover:bg-slate-800">
                <Icon name="up" className="h-4 w-4 text-slate-500 dark:text-slate-400" /> ..</button></li>
            )}
            {listing.entries.filter((e) => e.kind === 'dir' || (mode === 'file' && e.kind === 'file')).map((e) => (
              <li key={e.path}>
                <button type="button"
                  onClick={() => { if (e.kind === 'dir') void open(e.path); else onValue(e.path); }}
                  onDoubleClick={() => { if (e.kind === 'file') onPick?.(e.path); }}
                  className={`flex w-full items-center gap-2 px-3 py-1.5 text-left hover:bg-slate-50 dark:hover:bg-slate-800 ${value === e.path ? 'bg-teal-50 dark:bg-teal-950' : ''}`}>
                  <Icon name={e.kind === 'dir' ? 'folder' : e.image ? 'disk' : 'file'} className={`h-4 w-4 ${e.image ? 'text-teal-700 dark:text-teal-400' : 'text-slate-500 dark:text-slate-400'}`} />
                  <span className="min-w-0 flex-1 truncate">{e.name}</span>
                  {e.kind === 'file' && <span className="text-xs tabular-nums text-slate-500 dark:text-slate-400">{size(e.size)}</span>}
                </button>
              </li>
            ))}
            {listing.entries.length === 0 && <li className="px-3 py-2 text-slate-500 dark:text-slate-400">Empty folder</li>}
          </ul>
        )}
      </div>
    </div>
  );
}
